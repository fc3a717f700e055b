"""`pixsigma eval adherence` with a prompt file and --json, on the shipped model (few steps)."""

import json
import re

import pytest
import torch
from PIL import Image

from pixsigma.cli import main
from pixsigma.eval.adherence import load_prompt_set
from pixsigma.errors import PixsigmaError
from pixsigma.toy.evaluate import score

# Known prompts: one single-object prompt, one counting prompt, one outside the toy vocabulary.
PROMPTS = ["a red circle at the top left", "two blue squares", "a photo of a dog on a sofa"]
CATEGORIES = {"a red circle at the top left": "single", "two blue squares": "counting"}


def _table_rows(table: str) -> dict:
    """{category: (n, percent)} from the printed table's category rows."""
    rows = {}
    for line in table.splitlines():
        m = re.fullmatch(r"(\w+)\s+(\d+)\s+([\d.]+)%", line.strip())
        if m:
            rows[m[1]] = (int(m[2]), float(m[3]))
    return rows


def test_prompt_file_json_and_table_agree(tmp_path, capsys):
    torch.set_num_threads(1)
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n".join(PROMPTS) + "\n\n")  # blank lines are skipped
    report_path, images = tmp_path / "out" / "report.json", tmp_path / "images"
    rc = main(["eval", "adherence", "--prompts", str(prompts), "--seeds", "2", "--steps", "2", "--batch-size", "4",
               "--json", str(report_path), "--save-images", str(images)])
    assert rc == 0
    report = json.loads(report_path.read_text())
    table = capsys.readouterr().out

    # the JSON against the known prompts: 3 prompts x 2 seeds, the out-of-vocabulary one unscored
    assert report["n_images"] == 6 and report["n_scored"] == 4 and report["not_scorable"] == 2
    assert {c: e["n"] for c, e in report["categories"].items()} == {"single": 2, "counting": 2}
    assert report["single_attributes"]["n"] == 2
    settings = report["settings"]
    assert settings["prompt_set"] == str(prompts) and settings["prompts"] == 3 and settings["seeds"] == [0, 1]
    assert settings["steps"] == 2 and settings["dtype"] == "fp32" and settings["model"] == "default"

    # the printed table against the JSON
    rows = _table_rows(table)
    for category, entry in report["categories"].items():
        assert rows[category] == (entry["n"], round(100 * entry["accuracy"], 1)), (category, table)
    assert rows["overall"] == (4, round(100 * report["overall"], 1))
    assert "not scorable: 2 of 6 images" in table

    # the saved images, scored again one by one, give the report's counts (prompt-major, seed-minor)
    files = sorted(images.glob("*.png"))
    assert [f.name for f in files] == ["00000_s0.png", "00001_s1.png", "00002_s0.png", "00003_s1.png",
                                       "00004_s0.png", "00005_s1.png"]
    correct = {"single": 0, "counting": 0}
    for f, prompt in zip(files, [p for p in PROMPTS for _ in range(2)]):
        with Image.open(f) as im:
            res = score(prompt, im.convert("RGB"))
        assert res.scorable == (prompt in CATEGORIES)
        if res.scorable:
            assert res.category == CATEGORIES[prompt]
            correct[res.category] += int(res.correct)
    assert {c: e["correct"] for c, e in report["categories"].items()} == correct


@pytest.mark.parametrize("flags, message", [
    (["--prompts", "no/such/prompts.txt"], "neither one of"),
    (["--guidance-interval", "600,100"], "guidance interval"),  # checked by the pipeline, not the CLI
    (["--seeds", "0"], "at least one image per prompt"),
])
def test_bad_input_is_one_line(tmp_path, capsys, monkeypatch, flags, message):
    monkeypatch.delenv("PIXSIGMA_DEBUG", raising=False)
    rc = main(["eval", "adherence", "--prompts", "quick", "--seeds", "1", "--steps", "1", "--json", str(tmp_path / "r.json"),
               *flags])
    captured = capsys.readouterr()
    assert rc == 2 and captured.out == ""
    last = captured.err.strip().splitlines()[-1]
    assert last.startswith("pixsigma eval: error:") and message in last, captured.err
    assert "Traceback" not in captured.err and not (tmp_path / "r.json").exists()


def test_empty_prompt_file(tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_text("\n  \n")
    with pytest.raises(PixsigmaError, match="no prompts"):
        load_prompt_set(str(empty))
