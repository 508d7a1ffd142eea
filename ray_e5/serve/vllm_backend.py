"""vLLM's pooling runner as the replica's forward pass, for GPU nodes (``serve.backend: vllm``).

vLLM serves a merged model directory written by ``ray-e5 export`` (sentence-transformers layout). The replica
still tokenises (the instruction template, truncation, EOS for last-token pooling) and hands vLLM token ids, so
the vectors are those of the Embedder; vLLM runs and pools them on the GPU. Only the tokenizer and the small
sentence-transformers files are read here: the weights are loaded once, by vLLM.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from ray_e5.config import ModelSettings
from ray_e5.model.template import DEFAULT_TEMPLATE, format_query
from ray_e5.model.tokenize import check_texts, token_ids
from ray_e5.serve.config import ServeSettings

POOLING_FLAGS = {"pooling_mode_lasttoken": "last", "pooling_mode_mean_tokens": "mean", "pooling_mode_cls_token": "cls"}
VLLM_POOLING = {"last": "LAST", "mean": "MEAN", "cls": "CLS"}


class NotAMergedModel(ValueError):
    """serve.backend=vllm was pointed at something other than a ``ray-e5 export`` directory."""


@dataclass
class MergedModelText:
    """The text side of a merged model directory: tokenizer, pooling, template, length limit, dimension."""

    tokenizer: Any
    settings: ModelSettings
    dimension: int
    tokenizer_appends_eos: bool

    @classmethod
    def load(cls, model_dir: str | Path) -> "MergedModelText":
        from transformers import AutoTokenizer

        root = Path(model_dir)
        missing = [name for name in ("modules.json", "1_Pooling/config.json", "sentence_bert_config.json")
                   if not (root / name).is_file()]
        if missing:
            raise NotAMergedModel(f"serve.backend=vllm serves a merged model directory written by `ray-e5 export`; "
                                  f"{str(model_dir)!r} lacks {', '.join(missing)}. Export the embedder first, or use "
                                  "serve.backend=embedder (accepted backends: embedder, vllm)")
        pooling_flags = json.loads((root / "1_Pooling" / "config.json").read_text())
        pooling = next((mode for flag, mode in POOLING_FLAGS.items() if pooling_flags.get(flag)), None)
        if pooling is None:
            raise NotAMergedModel(f"{root / '1_Pooling' / 'config.json'} sets none of {sorted(POOLING_FLAGS)}")
        modules = json.loads((root / "modules.json").read_text())
        normalize = any(m.get("type", "").endswith("Normalize") for m in modules)
        max_length = int(json.loads((root / "sentence_bert_config.json").read_text())["max_seq_length"])
        st_config = root / "config_sentence_transformers.json"
        extra = json.loads(st_config.read_text()).get("ray_e5", {}) if st_config.is_file() else {}
        settings = ModelSettings(name=str(root), pooling=pooling, normalize=normalize, max_length=max_length,
                                 instruction_template=extra.get("instruction_template", DEFAULT_TEMPLATE))
        tokenizer = AutoTokenizer.from_pretrained(str(root))
        probe = tokenizer("a", add_special_tokens=True)["input_ids"]
        appends_eos = tokenizer.eos_token_id is not None and probe[-1:] == [tokenizer.eos_token_id]
        return cls(tokenizer, settings, int(pooling_flags["word_embedding_dimension"]), appends_eos)

    @property
    def append_eos(self) -> bool:
        """EOS must end every text for last-token pooling (our code adds it unless the tokenizer already does)."""
        return self.settings.pooling == "last" and not self.tokenizer_appends_eos

    def format(self, texts: Sequence[str], instruction: str | None = None) -> list[str]:
        return [format_query(t, instruction, self.settings.instruction_template) for t in check_texts(texts)]

    def token_ids(self, texts: Sequence[str], instruction: str | None = None) -> list[list[int]]:
        return token_ids(self.tokenizer, self.format(texts, instruction), self.settings.max_length, self.append_eos)


def vllm_engine_kwargs(settings: ServeSettings, model_dir: str, text: MergedModelText) -> dict[str, Any]:
    """Arguments for ``vllm.LLM``: the pooling runner with the export's pooling and normalisation."""
    return {"model": model_dir, "runner": "pooling", "tensor_parallel_size": settings.vllm.tensor_parallel_size,
            "gpu_memory_utilization": settings.vllm.gpu_memory_utilization, "dtype": settings.vllm_dtype(),
            "max_model_len": settings.vllm.max_model_len or text.settings.max_length,
            "pooler_config": {"pooling_type": VLLM_POOLING[text.settings.pooling], "normalize": text.settings.normalize}}


class VllmForward:
    """Token-id lists in, one float32 vector each out, computed by ``vllm.LLM.embed``."""

    def __init__(self, settings: ServeSettings, model_dir: str, text: MergedModelText):
        try:
            from vllm import LLM
            from vllm.config import PoolerConfig
        except ImportError as err:
            raise RuntimeError("serve.backend=vllm needs vLLM on the replica's node (a CUDA GPU node): "
                               "pip install 'ray-e5[gpu]'; or use serve.backend=embedder "
                               f"(accepted backends: embedder, vllm). Import error: {err}") from None
        kwargs = vllm_engine_kwargs(settings, model_dir, text)
        kwargs["pooler_config"] = PoolerConfig(**kwargs["pooler_config"])
        self.llm = LLM(**kwargs)

    def __call__(self, items: list[list[int]], alive=None) -> list:
        """Vectors for ``items``; an item whose request is already gone (``alive(i)`` false) is not sent (None)."""
        keep = [i for i in range(len(items)) if alive is None or alive(i)]
        out: list = [None] * len(items)
        if keep:
            outputs = self.llm.embed([{"prompt_token_ids": items[i]} for i in keep], use_tqdm=False)
            for i, o in zip(keep, outputs):
                out[i] = np.asarray(o.outputs.embedding, dtype=np.float32)
        return out
