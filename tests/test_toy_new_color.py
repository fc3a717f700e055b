"""A color outside the training palette ("lime"): data that carries it, prompts that ask for it,
and an evaluator that reads it - without changing the regular data."""

import numpy as np
import pytest

from pixsigma.errors import PixsigmaError
from pixsigma.eval.adherence import load_prompt_set
from pixsigma.toy import evaluate as E
from pixsigma.toy import prompts as P
from pixsigma.toy import render as R
from pixsigma.toy.reference import clean_render_accuracy


def test_new_color_is_outside_the_training_palette_and_far_from_it():
    assert "lime" in P.NEW_COLORS and "lime" not in P.COLORS and "lime" not in P.COLOR_NAMES
    rgb = np.array(P.NEW_COLORS["lime"], float)
    others = np.array([*P.COLORS.values(), *P.BACKGROUNDS.values()], float)
    assert np.sqrt(((others - rgb) ** 2).sum(1)).min() >= 100


def test_regular_data_never_draws_the_new_color_and_is_unchanged():
    plain = list(R.generate(60, seed=5))
    assert not any("lime" in short or "lime" in long_ for _, short, long_, _ in plain)
    again = list(R.generate(60, seed=5, new_color=None))
    assert all(np.array_equal(np.asarray(a[0]), np.asarray(b[0])) and a[1] == b[1] for a, b in zip(plain, again))


def test_new_color_scenes_render_caption_and_score_correctly():
    items = list(R.generate(120, seed=9, new_color="lime", new_color_share=0.5))
    with_lime = [it for it in items if any(o.color == "lime" for o in it[3].objects)]
    assert 35 <= len(with_lime) <= 85  # about half
    for img, short, long_, scene in with_lime:
        assert "lime" in long_  # short captions of some kinds name no color ("a circle and a cross")
    assert sum("lime" in short for _, short, _, _ in with_lime) >= len(with_lime) // 2
    report = E.evaluate((img, short, None) for img, short, _, _ in items)
    assert report["overall"] == 1.0  # the evaluator reads lime on exact renders, and every caption holds
    # a lime object read as another color would fail its prompt: the color reading is specific
    img, short, _, scene = next(it for it in with_lime if it[3].kind == "single")
    assert not E.score(short.replace("lime", "green"), img).correct
    assert not E.score(short.replace("lime", "yellow"), img).correct


def test_new_color_prompts_and_prompt_set():
    items = P.new_color_prompts("lime")
    assert len(items) == 40 and sum(i.category == "single" for i in items) == 36
    assert all(P.is_heldout_prompt(i.prompt) and "lime" in i.prompt for i in items)
    spec = P.parse_prompt(items[0].prompt)
    assert spec.objects[0].color == "lime"
    assert [i.prompt for i in load_prompt_set("new:lime")] == [i.prompt for i in items]
    rng = np.random.default_rng(0)
    for item in items[::7]:
        assert E.score(item.prompt, R.render(R.scene_from_prompt(item.prompt, rng))).correct
    with pytest.raises(PixsigmaError, match="new-color prompts need one of lime"):
        P.new_color_prompts("red")
    with pytest.raises(PixsigmaError, match="new_color 'red'"):
        list(R.generate(1, new_color="red"))


def test_evaluator_still_reads_the_training_palette_on_noisy_renders():
    """Adding a color to the evaluator must not make it misread the old ones."""
    rng = np.random.default_rng(4)

    def noisy(img):
        a = np.asarray(img).astype(float) + rng.normal(0, 12, np.asarray(img).shape)
        return np.clip(a, 0, 255).astype(np.uint8)

    report = clean_render_accuracy(200, seed=3, size=64, transform=noisy)
    assert report["overall"] >= 0.97
