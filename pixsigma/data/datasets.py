"""Captioned image datasets in three layouts, and per-sample caption choice.

Layouts (`layout="auto"` picks by what the path is):
- data_info: the official `data_info.json` (a list of records with path, height, width, ratio,
  prompt, and a long caption under `long_caption_key`, e.g. "sharegpt4v"); image paths are
  relative to the JSON's folder (or `image_root`). The path may be the JSON or its folder.
- folder: images (png/jpg/jpeg/webp/bmp) with a caption in `NAME.txt` beside each; a long
  caption, when present, in `NAME.long.txt`; an object mask, when present, in `NAME.mask.png`.
- jsonl: one JSON object per line with path, prompt and optionally the long caption key
  (`long_prompt` is accepted too); paths relative to the manifest's folder.

Any record may name a `loss_mask`: a grayscale image the size of the picture, white where the
objects are. Training can weight the diffusion loss there (`schedule.object_loss_weight`).
Any record may name a `control` image for ControlNet training (`NAME.control.png` in the folder
layout), aligned with the picture.

Records are sorted by path so indices are stable. Records with a missing image file, no
usable caption, an unreadable JSON line or an aspect ratio beyond `max_aspect_ratio` (either way)
are skipped with one warning per kind and counted in `dataset.skipped`; only a path that does
not exist (or holds no known layout) is an error.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from pixsigma.errors import PixsigmaError

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
SIDE_IMAGES = (".mask.png", ".control.png")  # images that belong to another (NAME.png), not samples
LAYOUTS = ("auto", "data_info", "folder", "jsonl")


@dataclass(frozen=True)
class Sample:
    path: str  # absolute image path
    prompt: str  # short (original) caption
    long_prompt: str | None  # dense caption (Share-Captioner / sharegpt4v), if any
    height: int | None = None  # from the metadata, or read from the image header lazily
    width: int | None = None
    loss_mask: str | None = None  # absolute path of a grayscale object mask (white = object), if any
    control: str | None = None  # absolute path of the ControlNet control image, if any


def use_long_caption(seed: int, epoch: int, index: int, ratio: float) -> bool:
    """Deterministic per-(seed, epoch, sample) coin with P(long) = ratio."""
    if ratio <= 0:
        return False
    if ratio >= 1:
        return True
    digest = hashlib.blake2b(f"{seed}:{epoch}:{index}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") / 2**64 < ratio


def image_size(path: str) -> tuple[int, int]:
    """(height, width) from the image header (no decoding)."""
    from PIL import Image

    with Image.open(path) as im:
        return im.height, im.width


class CaptionDataset:
    """A list of `Sample`s read from one of the three layouts (see the module docstring)."""

    def __init__(self, path, layout: str = "auto", long_caption_key: str = "sharegpt4v", max_aspect_ratio: float = 4.0,
                 image_root=None, check_files: bool = True):
        self.path = Path(path)
        if not self.path.exists():
            raise PixsigmaError(f"{self.path}: dataset path does not exist; expected a data_info.json (or its folder), "
                                "a folder of images with .txt captions, or a .jsonl manifest")
        if layout not in LAYOUTS:
            raise PixsigmaError(f"dataset layout {layout!r} is unknown; expected one of {LAYOUTS}")
        self.long_caption_key = long_caption_key
        self.max_aspect_ratio = float(max_aspect_ratio)
        self.image_root = Path(image_root) if image_root else None
        self.check_files = check_files
        self.skipped: Counter = Counter()
        self.layout = self._detect(layout)
        reader = {"data_info": self._read_data_info, "folder": self._read_folder, "jsonl": self._read_jsonl}[self.layout]
        samples = [s for s in reader() if self._keep(s)]
        samples.sort(key=lambda s: s.path)
        self.samples: list[Sample] = samples
        if self.skipped:
            log.warning("dataset %s: %d sample(s) kept, %d skipped (%s)", self.path, len(samples), sum(self.skipped.values()),
                        ", ".join(f"{k}: {v}" for k, v in sorted(self.skipped.items())))
        else:
            log.info("dataset %s (%s): %d samples", self.path, self.layout, len(samples))

    # -- layouts ---------------------------------------------------------------------------------
    def _detect(self, layout: str) -> str:
        if layout != "auto":
            return layout
        p = self.path
        if p.is_file():
            if p.suffix == ".jsonl":
                return "jsonl"
            if p.suffix == ".json":
                return "data_info"
            raise PixsigmaError(f"{p}: not a dataset file; expected data_info.json or a .jsonl manifest")
        if (p / "data_info.json").is_file():
            return "data_info"
        manifests = sorted(p.glob("*.jsonl"))
        if len(manifests) == 1 and not any(f.suffix.lower() in IMAGE_EXTENSIONS for f in p.iterdir()):
            self.path = manifests[0]
            return "jsonl"
        return "folder"

    def _skip(self, kind: str, detail: str) -> None:
        if not self.skipped[kind]:
            log.warning("skipping %s (%s); further ones are only counted", detail, kind)
        self.skipped[kind] += 1

    def _resolve(self, rel: str, base: Path) -> str:
        root = self.image_root or base
        return str((root / rel).resolve())

    def _record(self, rec: dict, base: Path, where: str) -> Sample | None:
        if not isinstance(rec, dict) or not isinstance(rec.get("path"), str):
            self._skip("bad record", where)
            return None
        prompt = rec.get("prompt")
        long_prompt = rec.get(self.long_caption_key, rec.get("long_prompt"))
        prompt = prompt.strip() if isinstance(prompt, str) else ""
        long_prompt = long_prompt.strip() if isinstance(long_prompt, str) and long_prompt.strip() else None
        if not prompt and not long_prompt:
            self._skip("empty caption", where)
            return None
        h, w = rec.get("height"), rec.get("width")
        h = int(h) if isinstance(h, (int, float)) and h > 0 else None
        w = int(w) if isinstance(w, (int, float)) and w > 0 else None
        mask = rec.get("loss_mask")
        mask = self._resolve(mask, base) if isinstance(mask, str) and mask else None
        control = rec.get("control")
        control = self._resolve(control, base) if isinstance(control, str) and control else None
        return Sample(self._resolve(rec["path"], base), prompt or long_prompt, long_prompt, h, w, mask, control)

    def _read_data_info(self):
        info = self.path if self.path.is_file() else self.path / "data_info.json"
        try:
            records = json.loads(info.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise PixsigmaError(f"{info}: not a readable data_info.json ({' '.join(str(e).split())})") from None
        if not isinstance(records, list):
            raise PixsigmaError(f"{info}: expected a JSON list of records with path, height, width, prompt")
        for i, rec in enumerate(records):
            s = self._record(rec, info.parent, f"{info.name} record {i}")
            if s is not None:
                yield s

    def _read_jsonl(self):
        base = self.path.parent
        with open(self.path, encoding="utf-8", errors="replace") as f:
            for n, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    rec = json.loads(line)
                except json.JSONDecodeError:
                    self._skip("unreadable JSON line", f"{self.path.name} line {n}")
                    continue
                s = self._record(rec, base, f"{self.path.name} line {n}")
                if s is not None:
                    yield s

    def _read_folder(self):
        for img in sorted(self.path.rglob("*")):
            if img.suffix.lower() not in IMAGE_EXTENSIONS or not img.is_file() or img.name.lower().endswith(SIDE_IMAGES):
                continue
            txt, long_txt = img.with_suffix(".txt"), img.with_suffix(".long.txt")
            prompt = txt.read_text(encoding="utf-8", errors="replace").strip() if txt.is_file() else ""
            long_prompt = long_txt.read_text(encoding="utf-8", errors="replace").strip() if long_txt.is_file() else ""
            if not prompt and not long_prompt:
                self._skip("empty caption", str(img))
                continue
            mask, control = img.with_name(img.stem + ".mask.png"), img.with_name(img.stem + ".control.png")
            yield Sample(str(img.resolve()), prompt or long_prompt, long_prompt or None,
                         loss_mask=str(mask.resolve()) if mask.is_file() else None,
                         control=str(control.resolve()) if control.is_file() else None)

    # -- filtering -------------------------------------------------------------------------------
    def _keep(self, s: Sample) -> bool:
        if self.check_files and not Path(s.path).is_file():
            self._skip("missing image", s.path)
            return False
        h, w = s.height, s.width
        if (h is None or w is None) and self.check_files:
            try:
                h, w = image_size(s.path)
            except Exception:  # noqa: BLE001 - any unreadable header: skipped, counted
                self._skip("unreadable image", s.path)
                return False
        if h and w and max(h / w, w / h) > self.max_aspect_ratio:
            self._skip(f"aspect ratio > {self.max_aspect_ratio:g}", s.path)
            return False
        return True

    def size_of(self, index: int) -> tuple[int, int]:
        s = self.samples[index]
        if s.height and s.width:
            return s.height, s.width
        return image_size(s.path)

    def fingerprint(self) -> str:
        """A short hash of the sample list (paths and captions): caches are tied to it."""
        h = hashlib.sha256()
        for s in self.samples:
            h.update(json.dumps([s.path, s.prompt, s.long_prompt]).encode())
        return h.hexdigest()[:16]

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int) -> Sample:
        return self.samples[i]


def _cover_crop(path, height: int, width: int, mode: str):
    """Decode in `mode` (a path, or an already decoded PIL image), resize to cover (height, width),
    center-crop → float32 array in [0, 255]."""
    import contextlib

    import numpy as np
    from PIL import Image

    with (contextlib.nullcontext(path) if isinstance(path, Image.Image) else Image.open(path)) as im:
        im = im.convert(mode)
        scale = max(height / im.height, width / im.width)
        rh, rw = max(height, round(im.height * scale)), max(width, round(im.width * scale))
        if (rh, rw) != (im.height, im.width):
            im = im.resize((rw, rh), Image.BICUBIC)
        top, left = (rh - height) // 2, (rw - width) // 2
        im = im.crop((left, top, left + width, top + height))
        return np.asarray(im, dtype=np.float32)


def load_image(path: str, height: int, width: int):
    """Decode, resize to cover (height, width), center-crop → (3, H, W) float tensor in [-1, 1]."""
    import torch

    arr = _cover_crop(path, height, width, "RGB") / 127.5 - 1.0
    return torch.from_numpy(arr.copy()).permute(2, 0, 1)


def load_loss_mask(path: str, height: int, width: int, factor: int):
    """An object mask cropped as `load_image` crops its picture, then averaged over each latent
    cell (factor × factor pixels) → (1, H / factor, W / factor) float tensor in [0, 1]."""
    import torch

    arr = torch.from_numpy(_cover_crop(path, height, width, "L").copy()) / 255.0
    return torch.nn.functional.avg_pool2d(arr[None, None].clamp(0, 1), factor)[0]


def load_control(sample: Sample, height: int, width: int, kind: str = "none"):
    """A sample's control image for ControlNet training, cropped as `load_image` crops its picture
    → (3, H, W) float tensor in [-1, 1], or None when it has none.

    kind (`pixsigma.data.control.CONTROL_TYPES`): "none" uses the record's control image as it is;
    "canny" / "mask" apply that preprocessor to the record's control image, or to the picture
    itself when the record names none."""
    import torch
    from PIL import Image

    from pixsigma.data.control import preprocess, read_control_image

    source = sample.control or (sample.path if kind != "none" else None)
    if source is None:
        return None
    rgb = Image.fromarray(preprocess(read_control_image(source), kind))
    arr = _cover_crop(rgb, height, width, "RGB") / 127.5 - 1.0
    return torch.from_numpy(arr.copy()).permute(2, 0, 1)
