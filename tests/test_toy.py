"""Tests for pixsigma.toy: generator determinism, captions, the prompt parser and the evaluator."""

import ast
import json
import math
import os

import numpy as np
import pytest
from PIL import Image, ImageDraw, ImageFilter

from pixsigma.errors import PixsigmaError
from pixsigma.toy import evaluate as E
from pixsigma.toy import prompts as P
from pixsigma.toy import render as R
from pixsigma.toy import scene as S
from pixsigma.toy.reference import clean_render_accuracy
from pixsigma.data.datasets import CaptionDataset


def _scenes(n, seed=11, kind=None):
    return [R.sample_scene(np.random.default_rng([seed, i]), kind=kind) for i in range(n)]


# --------------------------------------------------------------------------- generator


def test_generate_is_deterministic_and_seed_dependent():
    a = list(R.generate(6, seed=3, size=64))
    b = list(R.generate(6, seed=3, size=64))
    c = list(R.generate(6, seed=4, size=64))
    for (ia, sa, la, _), (ib, sb, lb, _) in zip(a, b):
        assert np.array_equal(np.asarray(ia), np.asarray(ib))
        assert (sa, la) == (sb, lb)
    differ = sum(not np.array_equal(np.asarray(x[0]), np.asarray(y[0])) for x, y in zip(a, c))
    assert differ == 6
    assert [x[1] for x in a] != [x[1] for x in c]
    # item i does not depend on how many items came before it
    tail = list(R.generate(3, seed=3, size=64, start=3))
    for (ia, sa, la, _), (ib, sb, lb, _) in zip(a[3:], tail):
        assert np.array_equal(np.asarray(ia), np.asarray(ib)) and sa == sb and la == lb


@pytest.mark.parametrize("size", [32, 64, 128])
def test_render_sizes(size):
    img, short, long_, scene = next(R.generate(1, seed=0, size=size))
    assert img.mode == "RGB" and img.size == (size, size)
    assert short and long_ and len(long_) > len(short)


def test_bad_inputs_raise_pixsigma_error():
    scene = _scenes(1)[0]
    with pytest.raises(PixsigmaError):
        R.render(scene, size=4)
    bad = S.Scene(objects=[S.SceneObject("circle", "brown", 0.5, 0.5, 0.3)], background="white")
    with pytest.raises(PixsigmaError):
        R.render(bad, 64)
    with pytest.raises(PixsigmaError):
        R.sample_scene(np.random.default_rng(0), kind="nonsense")
    with pytest.raises(PixsigmaError):
        E.detect_objects(np.zeros((64, 64), dtype=np.uint8))
    with pytest.raises(PixsigmaError):
        R.scene_from_prompt("a photo of a cat", np.random.default_rng(0))


def test_scene_geometry_and_captions():
    scenes = _scenes(400, seed=5)
    kinds = {s.kind for s in scenes}
    assert kinds == set(R.SCENE_KINDS)
    for s in scenes:
        assert 1 <= len(s.objects) <= 3
        for o in s.objects:
            lo, hi = S.SIZE_RANGES[o.size_name]
            assert lo <= o.size <= hi
            assert o.size / 2 <= o.x <= 1 - o.size / 2 and o.size / 2 <= o.y <= 1 - o.size / 2
            # center strictly inside its cell, with the margin
            row, col = P.cell_index(o.cell)
            assert col / 3 + S.CELL_MARGIN - 1e-9 <= o.x <= (col + 1) / 3 - S.CELL_MARGIN + 1e-9
            assert row / 3 + S.CELL_MARGIN - 1e-9 <= o.y <= (row + 1) / 3 - S.CELL_MARGIN + 1e-9
        for i in range(len(s.objects)):
            for j in range(i + 1, len(s.objects)):
                assert R._separated(s.objects[i], s.objects[j])
        # the short caption parses and the ground truth satisfies it
        spec = P.parse_prompt(s.short_caption)
        assert spec is not None, s.short_caption
        assert S.score_detections(spec, S.detections_from_scene(s)).correct, s.short_caption
        assert s.background in s.long_caption
        for o in s.objects:
            assert f"{o.color} {o.shape}" in s.long_caption
    # medium objects span 18-23 px at 64 px
    med = [o.size * 64 for s in scenes for o in s.objects if o.size_name == "medium"]
    assert 18 <= min(med) and max(med) <= 23
    # caption variety: at least 3 templates per caption kind
    intros = {s.long_caption.split(".")[0].split(" ")[1] for s in scenes}
    assert len(intros) >= 3
    for kind in ("single", "two_objects", "counting", "position"):
        forms = set()
        for s in scenes:
            if s.kind == kind:
                forms.add(" ".join("X" if w in P.COLORS or w.rstrip("s") in P.SHAPES or w in ("cross", "crosses")
                                   else w for w in s.short_caption.split()))
        assert len(forms) >= 3, (kind, forms)


def test_shape_regions_have_their_areas():
    """The shared shape geometry against hand-computed areas in the unit box: disc pi/4, square 1,
    triangle 1/2, plus sign 2a - a^2 with arm width a = CROSS_ARM."""
    g = (np.arange(2000) + 0.5) / 2000
    u, v = np.meshgrid(g, g)
    expected = {"circle": math.pi / 4, "square": 1.0, "triangle": 0.5, "cross": 2 * S.CROSS_ARM - S.CROSS_ARM ** 2}
    for shape, area in expected.items():
        assert abs(S.inside_shape(shape, u, v).mean() - area) < 2e-3, shape
    assert S.inside_shape("triangle", np.array([0.5, 0.1]), np.array([0.02, 0.1])).tolist() == [True, False]
    with pytest.raises(PixsigmaError, match="unknown shape"):
        S.inside_shape("hexagon", u, v)


def test_renderer_and_evaluator_do_not_import_each_other():
    """Both build on pixsigma.toy.scene; only pixsigma.toy.reference uses the two together."""
    def imported(module):
        tree = ast.parse(open(module.__file__).read())
        names = set()
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                names |= {a.name for a in node.names}
            elif isinstance(node, ast.ImportFrom) and node.module:
                names |= {node.module} | {f"{node.module}.{a.name}" for a in node.names}
        return names

    assert "pixsigma.toy.evaluate" not in imported(R)
    assert "pixsigma.toy.render" not in imported(E)
    assert not {n for n in imported(S) if n.startswith(("pixsigma.toy.render", "pixsigma.toy.evaluate"))}


def test_scene_dict_round_trip():
    s = _scenes(1, seed=2, kind="position")[0]
    d = json.loads(json.dumps(s.to_dict()))
    back = S.Scene.from_dict(d, s.short_caption, s.long_caption)
    assert np.array_equal(np.asarray(R.render(back, 64)), np.asarray(R.render(s, 64)))
    assert back.relations == s.relations and len(back.relations) == 1


# --------------------------------------------------------------------------- prompts


def test_parser_known_prompts():
    spec = P.parse_prompt("a photo of a red circle at the top left")
    assert spec.objects == (P.ObjectClause(1, False, "red", "circle", "top left"),) and spec.category == "single"
    spec = P.parse_prompt("Two green triangles.")
    assert spec.objects == (P.ObjectClause(2, True, "green", "triangle", None),) and spec.category == "counting"
    spec = P.parse_prompt("a yellow cross in the upper-right corner of the image")
    assert spec.objects[0].position == "top right"
    spec = P.parse_prompt("a red circle to the left of a blue square")
    assert spec.relations == (P.RelationClause(0, "left of", 1),) and spec.category == "position"
    spec = P.parse_prompt("a cyan cross is below a pink triangle on a beige background")
    assert spec.relations[0].relation == "below" and spec.objects[1].color == "pink"
    assert P.parse_prompt("red circle, top left").objects[0].position == "top left"
    assert P.parse_prompt("a circle and a square").category == "two_objects"
    assert P.parse_prompt("a red circle and a blue square").category == "color_attr"
    assert P.parse_prompt("an orange square").category == "colors"
    assert P.parse_prompt("a red circle on the left").objects[0].position == "left"
    assert P.parse_prompt("a blue square in the middle").objects[0].position == "center"
    three = P.parse_prompt("a red circle, a blue square and a green cross")
    assert [o.shape for o in three.objects] == ["circle", "square", "cross"]


@pytest.mark.parametrize("text", ["a photo of a cat", "a red circle next to a dog", "", "blue", "a circles",
                                  "a red hexagon", "a circle at the far away", "four score and seven years"])
def test_parser_out_of_vocabulary_is_not_scorable(text):
    assert P.parse_prompt(text) is None
    res = E.score(text, np.full((64, 64, 3), 128, dtype=np.uint8))
    assert res.scorable is False and res.correct is False


def test_heldout_prompts():
    items = P.heldout_prompts()
    assert len(items) >= 200
    assert len({i.prompt for i in items}) == len(items)
    assert items == P.heldout_prompts()
    assert [i.prompt for i in items] != [i.prompt for i in P.heldout_prompts(seed=1)]
    assert {i.category for i in items} == set(P.CATEGORIES)
    for item in items:
        assert P.is_heldout_prompt(item.prompt)
        assert P.parse_prompt(item.prompt).category == item.category, item
    quick = P.quick_prompts()
    assert len(quick) == 24
    for item in quick:
        assert P.parse_prompt(item.prompt).category == item.category, item
    # training captions never produce a held-out prompt verbatim ...
    heldout = {i.prompt for i in P.heldout_prompts(n=600)}
    captions = [s.short_caption for s in _scenes(600, seed=9)]
    assert not any(P.is_heldout_prompt(c) for c in captions)
    assert not heldout.intersection(captions)
    # ... unless asked to
    loose = [R.sample_scene(np.random.default_rng([9, i]), exclude_heldout=False).short_caption for i in range(200)]
    assert sum(P.is_heldout_prompt(c) for c in loose) >= 10


# --------------------------------------------------------------------------- evaluator


def _noise_blur(seed=0, std=8.0, radius=0.8):
    rng = np.random.default_rng(seed)

    def transform(img):
        img = img.filter(ImageFilter.GaussianBlur(radius))
        arr = np.asarray(img).astype(np.float32) + rng.normal(0.0, std, size=(img.height, img.width, 3))
        return np.clip(arr + 0.5, 0, 255).astype(np.uint8)

    return transform


def _check_report(report, min_acc=0.99):
    assert report["not_scorable"] == 0
    cats = report["categories"]
    assert set(P.CATEGORIES) <= set(cats)
    for cat, entry in cats.items():
        assert entry["n"] >= 10, (cat, entry)
        assert entry["accuracy"] >= min_acc, (cat, entry)
    sa = report["single_attributes"]
    assert sa["n"] >= 30
    for key in ("color", "shape", "position", "all"):
        assert sa[key] >= min_acc, (key, sa)


def test_clean_render_accuracy():
    report = clean_render_accuracy(400, seed=0, size=64)
    assert report["n_images"] == 400
    _check_report(report)


def test_noisy_blurred_render_accuracy():
    report = clean_render_accuracy(400, seed=1, size=64, transform=_noise_blur())
    _check_report(report)


def test_low_res_accuracy():
    report = clean_render_accuracy(200, seed=2, size=32)
    _check_report(report)


def test_evaluator_rejects_wrong_prompts():
    """Perturbing one attribute of the prompt must make the image incorrect."""
    rng = np.random.default_rng(0)
    wrong = {"color": 0, "shape": 0, "position": 0, "count": 0, "relation": 0}
    n = 30
    for i in range(n):
        s = R.sample_scene(np.random.default_rng([21, i]), kind="single")
        o = s.objects[0]
        img = R.render(s, 64)
        dets = E.detect_objects(img)
        right = E.score(P.object_phrase(o.color, o.shape, 1, o.cell), detections=dets)
        assert right.correct and right.all_ok
        other_color = [c for c in P.COLOR_NAMES if c != o.color][int(rng.integers(7))]
        other_shape = [x for x in P.SHAPES if x != o.shape][int(rng.integers(3))]
        other_cell = [x for x in P.POSITIONS if x != o.cell][int(rng.integers(8))]
        r = E.score(P.object_phrase(other_color, o.shape, 1, o.cell), detections=dets)
        wrong["color"] += r.correct
        assert r.color_ok is False and r.shape_ok and r.position_ok
        r = E.score(P.object_phrase(o.color, other_shape, 1, o.cell), detections=dets)
        wrong["shape"] += r.correct
        assert r.shape_ok is False and r.color_ok and r.position_ok
        r = E.score(P.object_phrase(o.color, o.shape, 1, other_cell), detections=dets)
        wrong["position"] += r.correct
        assert r.position_ok is False and r.color_ok and r.shape_ok

        c = R.sample_scene(np.random.default_rng([22, i]), kind="counting")
        k = len(c.objects)
        same = len({x.color for x in c.objects}) == 1
        prompt = P.object_phrase(c.objects[0].color if same else None, c.objects[0].shape, k % 3 + 1, exact=True)
        wrong["count"] += E.score(prompt, R.render(c, 64)).correct

        p = R.sample_scene(np.random.default_rng([23, i]), kind="position")
        a, rel, b = p.relations[0]
        flipped = {"left of": "right of", "right of": "left of", "above": "below", "below": "above"}[rel]
        oa, ob = p.objects[a], p.objects[b]
        prompt = f"{P.object_phrase(oa.color, oa.shape)} {flipped} {P.object_phrase(ob.color, ob.shape)}"
        res = E.score(prompt, R.render(p, 64))
        wrong["relation"] += res.correct
        assert res.clauses[-1].ok is False
    assert wrong == {"color": 0, "shape": 0, "position": 0, "count": 0, "relation": 0}


def test_rounded_square_reads_as_circle():
    def blob(radius_frac):
        big = Image.new("RGB", (256, 256), P.BACKGROUNDS["light gray"])
        side = 80
        ImageDraw.Draw(big).rounded_rectangle([88, 88, 88 + side - 1, 88 + side - 1],
                                              radius=int(radius_frac * side), fill=P.COLORS["blue"])
        return big.resize((64, 64), Image.BOX)

    assert [d.shape for d in E.detect_objects(blob(0.05))] == ["square"]
    assert [d.shape for d in E.detect_objects(blob(0.45))] == ["circle"]


def test_detect_objects_reports_geometry():
    s = S.Scene(objects=[S.SceneObject("triangle", "orange", 0.2, 0.8, 0.3)], background="navy")
    dets = E.detect_objects(R.render(s, 64))
    assert len(dets) == 1
    d = dets[0]
    assert (d.color, d.shape, d.cell) == ("orange", "triangle", "bottom left")
    assert abs(d.center[0] - 0.2) < 0.02 and abs(d.center[1] - 0.8) < 0.02
    assert abs(d.area - 0.5 * 0.3 * 0.3) < 0.01
    # nothing on an empty canvas, nothing for an off-palette color
    assert E.detect_objects(np.full((64, 64, 3), 205, dtype=np.uint8)) == []
    off = Image.new("RGB", (64, 64), (12, 12, 12))
    ImageDraw.Draw(off).ellipse([20, 20, 40, 40], fill=(250, 250, 250))
    assert E.detect_objects(off) == []


def test_evaluate_format_and_save(tmp_path):
    items = []
    for i, item in enumerate(P.quick_prompts()):
        scene = R.scene_from_prompt(item.prompt, np.random.default_rng([4, i]))
        items.append((R.render(scene, 64), item.prompt, item.category))
    blank = np.full((64, 64, 3), 250, dtype=np.uint8)
    items.append((blank, "a photo of a cat"))
    items.append((blank, "a photo of a red circle at the top left"))
    report = E.evaluate(items)
    assert report["n_images"] == 26 and report["not_scorable"] == 1
    assert report["categories"]["single"] == {"n": 5, "correct": 4, "accuracy": 0.8}
    for cat in P.CATEGORIES:
        if cat != "single":
            assert report["categories"][cat]["accuracy"] == 1.0
    assert report["single_attributes"]["all"] == 0.8
    # shape confusion: each quick single prompt's shape read back on its render; the blank
    # image's red circle has no detection ("none")
    confusion = report["shape_confusion"]
    for shape in ("square", "triangle", "cross"):
        assert confusion[shape] == {s: int(s == shape) for s in (*P.SHAPES, "none")}
    assert confusion["circle"] == {"circle": 1, "square": 0, "triangle": 0, "cross": 0, "none": 1}
    table = E.format_table(report)
    assert "two_objects" in table and "80.0%" in table and "not scorable: 1" in table
    assert "shape read (columns)" in table
    path = tmp_path / "sub" / "report.json"
    E.save_json(report, str(path))
    assert json.loads(path.read_text()) == json.loads(json.dumps(report))


def test_write_dataset(tmp_path):
    info_path = R.write_dataset(str(tmp_path), n=6, seed=1, size=32)
    assert info_path == os.path.join(str(tmp_path), "data_info.json")
    records = json.loads(open(info_path).read())
    assert len(records) == 6
    expected = list(R.generate(6, seed=1, size=32))
    for rec, (img, short, long_, scene) in zip(records, expected):
        assert {"path", "height", "width", "ratio", "prompt", "sharegpt4v", "scene"} <= set(rec)
        assert rec["height"] == rec["width"] == 32 and rec["ratio"] == 1.0
        assert rec["prompt"] == short and rec["sharegpt4v"] == long_
        assert rec["scene"] == scene.to_dict()
        with Image.open(tmp_path / rec["path"]) as im:
            assert im.size == (32, 32)
            assert np.array_equal(np.asarray(im.convert("RGB")), np.asarray(img))
        with Image.open(tmp_path / rec["loss_mask"]) as m:  # the object mask: exactly where the image is off-background
            mask = np.asarray(m)
        assert m.mode == "L" and mask.shape == (32, 32) and mask.max() == 255
        off = np.abs(np.asarray(img, dtype=int) - np.asarray(P.BACKGROUNDS[scene.background])).max(axis=2) > 0
        assert (mask > 0)[off].all() and off[mask >= 128].all()  # (a sliver of coverage may round to the background)
    assert not list(tmp_path.rglob(".*"))  # no temporary file left behind by the atomic writes
    assert len(CaptionDataset(str(tmp_path))) == 6 and CaptionDataset(str(tmp_path))[0].loss_mask.endswith("0000000.mask.png")
    report = E.evaluate_folder(str(tmp_path))
    assert report["n_scored"] == 6 and report["overall"] == 1.0
