"""Resolution bins, size parsing, inline prompt options, resize + crop."""

import pytest
import torch

from pixsigma.errors import PixsigmaError
from pixsigma.resolution import (
    aspect_ratio_bins,
    check_side,
    nearest_bin,
    parse_prompt_options,
    parse_ratio,
    parse_size,
    plan_size,
    resize_and_crop,
    size_for_ratio,
    table_sizes,
)


def test_tables_present():
    assert {256, 512, 1024, 2048, 4096} <= set(table_sizes())
    for res in (256, 512, 1024, 2048, 4096):
        bins = aspect_ratio_bins(res)
        assert len(bins) == 40
        assert bins["1.0"] == (res, res)


@pytest.mark.parametrize("res", [256, 512, 1024, 2048, 4096])
def test_every_row_maps_to_itself(res):
    # (the 2880 table's three narrowest rows are off their nominal ratio in the release itself)
    bins = aspect_ratio_bins(res)
    for ratio, (h, w) in bins.items():
        assert nearest_bin(h, w, bins) == (h, w), ratio
        assert plan_size(h, w, res, 16) == (h, w)


def test_scaled_table_for_other_sizes():
    # a 64 px model (e.g. sample_size 8 with a factor-8 VAE, patch 2 → 16 px multiples)
    bins = aspect_ratio_bins(64, multiple=16)
    assert bins["1.0"] == (64, 64)
    for ratio, (h, w) in bins.items():
        assert h % 16 == 0 and w % 16 == 0 and h >= 16 and w >= 16
        assert nearest_bin(h, w, bins) in bins.values()
    # each bin still lands near its ratio when the rounding allows
    big = aspect_ratio_bins(1536, multiple=16)
    for ratio, (h, w) in big.items():
        assert abs(h / w - float(ratio)) / float(ratio) < 0.1


def test_odd_requests_come_back_at_exact_size():
    images = torch.rand(1, 3, 64, 96)
    for h, w in [(700, 1000), (1000, 700), (33, 77), (5, 3), (64, 96)]:
        gen = plan_size(h, w, 1024, 16)
        assert gen in aspect_ratio_bins(1024).values()
        out = resize_and_crop(images, h, w)
        assert out.shape[-2:] == (h, w)
    assert plan_size(600, 1000, 1024, 16) == (768, 1280)  # ratio 0.6 → the 0.6 bin
    assert plan_size(30, 50, 32, 4, binning=False) == (32, 52)


def test_resize_and_crop_is_centered():
    img = torch.zeros(1, 1, 4, 8)
    img[..., :, 2:6] = 1.0
    out = resize_and_crop(img, 4, 4)
    assert torch.all(out == 1.0)


def test_parse_size_and_ratio():
    assert parse_size("1024x768") == (768, 1024)
    assert parse_size(" 640 X 480 ") == (480, 640)
    assert parse_ratio("16:9") == pytest.approx(16 / 9)
    h, w = size_for_ratio(1.0, 1024)
    assert (h, w) == (1024, 1024)
    h, w = size_for_ratio(2.0, 1024)
    assert h / w == pytest.approx(2.0, rel=0.01)


@pytest.mark.parametrize("bad", ["0x512", "-5x512", "512x9000", "axb", "512", "512x", "1.5x512", ""])
def test_bad_sizes(bad):
    with pytest.raises(PixsigmaError) as e:
        parse_size(bad)
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("bad", [0, -1, 8193, "x", None, 2.5])
def test_bad_sides(bad):
    with pytest.raises(PixsigmaError):
        check_side(bad)


@pytest.mark.parametrize("bad", ["16", "0:9", "a:b", "16:-9"])
def test_bad_ratio(bad):
    with pytest.raises(PixsigmaError):
        parse_ratio(bad)


def test_inline_prompt_options():
    assert parse_prompt_options("a cat --ar 16:9") == ("a cat", {"ar": pytest.approx(16 / 9)})
    assert parse_prompt_options("a dog --hw 1024:768") == ("a dog", {"hw": (1024, 768)})
    assert parse_prompt_options("a bird --aspect_ratio 1:2 extra") == ("a bird", {"ar": 0.5})
    assert parse_prompt_options("plain prompt") == ("plain prompt", {})
    with pytest.raises(PixsigmaError):
        parse_prompt_options("a cat --hw 0:768")
    with pytest.raises(PixsigmaError):
        parse_prompt_options("a cat --ar wide")
