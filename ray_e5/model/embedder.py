"""The Embedder: a backbone, a tokenizer and the settings that turn token states into text vectors.

It is a ``torch.nn.Module`` so that training wraps it unchanged (DDP, DeepSpeed); ``encode`` is the inference
path every other stage uses. An embedder directory holds ``ray_e5.json`` (base model reference, pooling,
normalisation, max length, template) and, after LoRA training, ``adapter/``.

``ray_e5.json`` is the manifest: it is written last and lists every file the embedder needs (``files``: path ->
size). A directory whose manifest names files that are not there is refused by :meth:`Embedder.load`
(:class:`IncompleteEmbedderError`) rather than loaded as the bare base model: that is what a publish cut off half-way
leaves, and serving it would answer with the untrained model under the trained one's name.
"""

from __future__ import annotations

import inspect
import json
import uuid
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from ray_e5.settings import ModelSettings, validate
from ray_e5.model.template import format_query
from ray_e5.model.pooling import pool
from ray_e5.model.references import Backbone, UnknownModelError, resolve_backbone
from ray_e5.model.tokenize import check_texts, pad, token_ids
from ray_e5.rundir import EMBEDDER_FILE  # the manifest's name, with the rest of the run directory's layout

ADAPTER_DIR = "adapter"
#: the ``ray_e5.json`` block of the settings a run scored this embedder with (what serve, export and the card use)
INFERENCE_KEY = "inference"
#: the ModelSettings fields an inference block may set; ``dtype`` may also be ``auto`` (resolved on the loading node)
INFERENCE_FIELDS = ("max_length", "dtype", "pooling", "normalize", "instruction_template")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


class IncompleteEmbedderError(UnknownModelError):
    """An embedder directory whose manifest (``ray_e5.json``) names files that are missing or of another size."""


def is_embedder_dir(path: str | Path) -> bool:
    return (Path(path) / EMBEDDER_FILE).is_file()


def manifest_files(directory: str | Path) -> dict[str, int]:
    """path (relative, '/'-separated) -> size of every file under ``directory`` but the manifest itself."""
    directory = Path(directory)
    return {p.relative_to(directory).as_posix(): p.stat().st_size for p in sorted(directory.rglob("*"))
            if p.is_file() and not p.name.startswith(EMBEDDER_FILE)}  # the manifest, or its leftover .tmp


def check_complete(directory: str | Path, saved: dict) -> None:
    """Raise :class:`IncompleteEmbedderError` when a file the manifest needs is absent or of another size.
    Manifests written before ``files`` existed need ``adapter/`` exactly when they record LoRA settings."""
    directory = Path(directory)
    needed = saved.get("files")
    if needed is None:
        needed = {f"{ADAPTER_DIR}/adapter_config.json": None} if saved.get("lora") else {}
    problems = []
    for rel, size in sorted(needed.items()):
        path = directory / rel
        if not path.is_file():
            problems.append(f"{rel} is missing")
        elif size is not None and path.stat().st_size != size:
            problems.append(f"{rel} has {path.stat().st_size} bytes, not {size}")
    if problems:
        shown = "; ".join(problems[:5]) + (f" (and {len(problems) - 5} more)" if len(problems) > 5 else "")
        raise IncompleteEmbedderError(
            f"embedder {str(directory)!r} is incomplete: its {EMBEDDER_FILE} needs files that are not there "
            f"({shown}); its publish was interrupted (a training killed while writing embedder/, or a copy cut "
            "off). Loading it would give the untrained base model. Rerun `ray-e5 train` on this run directory: it "
            "resumes from its last checkpoint and publishes the embedder again")


def read_inference(directory: str | Path) -> dict[str, Any]:
    """The inference block of an embedder directory's ``ray_e5.json`` (``{}`` for anything else): the settings the
    run scored it with, which a plain load, serve and export default to so that what is served is what was scored."""
    path = Path(directory) / EMBEDDER_FILE
    if not path.is_file():
        return {}
    return dict(json.loads(path.read_text()).get(INFERENCE_KEY) or {})


def inference_defaults(inference: dict[str, Any]) -> dict[str, Any]:
    """ModelSettings fields from an inference block, ``dtype: auto`` resolved for this node (bf16 where native)."""
    out = {k: inference[k] for k in INFERENCE_FIELDS if inference.get(k) is not None}
    if out.get("dtype") == "auto":
        from ray_e5.model.precision import inference_dtype

        out["dtype"] = inference_dtype("auto")
    return out


def _natural_pooling(backbone: Backbone, config) -> str:
    if backbone.natural_pooling:
        return backbone.natural_pooling
    archs = config.architectures or []
    decoder = getattr(config, "is_decoder", False) or any(a.endswith("ForCausalLM") for a in archs)
    encoder_types = {"bert", "roberta", "xlm-roberta", "mpnet", "deberta", "deberta-v2", "distilbert", "electra",
                     "modernbert", "nomic_bert", "new"}
    return "last" if decoder or config.model_type not in encoder_types else "mean"


class Embedder(torch.nn.Module):
    def __init__(self, backbone: torch.nn.Module, tokenizer, settings: ModelSettings, base_reference: str):
        super().__init__()
        self.backbone = backbone
        self.tokenizer = tokenizer
        self.settings = settings
        self.base_reference = base_reference
        self.inference: dict[str, Any] = {}  # the scored settings (see read_inference); saved with the embedder
        params = inspect.signature(self._base_model().forward).parameters
        self._takes_position_ids = "position_ids" in params
        # An embedding forward never decodes: a KV cache would only hold memory (128 KB a token for Mistral-7B bf16)
        self._takes_use_cache = "use_cache" in params

    # ---- construction -------------------------------------------------------------------------------------
    @classmethod
    def load(cls, reference: str | Path, merge_lora: bool = False, trainable: bool = False, **overrides: Any) -> "Embedder":
        """Load an embedder directory, a packaged name, a .gguf file, a model directory or a hub id.

        ``overrides`` are ModelSettings fields (pooling, normalize, max_length, dtype, lora, ...). An embedder
        directory whose ``ray_e5.json`` has an ``inference`` block (the max length, dtype, ... its run was scored
        with) loads with those unless ``overrides`` say otherwise, except for training (``trainable``), which keeps
        the settings it was trained with.
        """
        reference = str(reference)
        if is_embedder_dir(reference):
            saved = json.loads((Path(reference) / EMBEDDER_FILE).read_text())
            check_complete(reference, saved)  # the manifest first: a half-published embedder is refused
            fields = {k: v for k, v in saved.items() if k in ModelSettings.model_fields}
            fields["name"] = saved["base_model"]
            inference = dict(saved.get(INFERENCE_KEY) or {})
            if not trainable:
                fields.update(inference_defaults(inference))
            settings = validate(ModelSettings, {**fields, **overrides}, prefix="model.")
            adapter = Path(reference) / ADAPTER_DIR
            embedder = cls.from_settings(settings.model_copy(update={"lora": None}))
            if adapter.is_dir():
                from ray_e5.model.lora import load_lora

                embedder.backbone = load_lora(embedder.backbone, str(adapter), trainable=trainable)
                embedder.settings = settings
                if merge_lora and not trainable:
                    embedder.backbone = embedder.backbone.merge_and_unload()
            embedder.inference = inference
            return embedder
        settings = validate(ModelSettings, {"name": reference, **overrides}, prefix="model.")
        return cls.from_settings(settings)

    @classmethod
    def from_settings(cls, settings: ModelSettings) -> "Embedder":
        from transformers import AutoConfig, AutoModel, AutoTokenizer

        from ray_e5.model.context import apply_long_context
        from ray_e5.model.depth import keep_first_layers, quiet_cut_layers

        backbone_ref = resolve_backbone(settings.name)
        try:
            tokenizer = AutoTokenizer.from_pretrained(backbone_ref.path)
            config = AutoConfig.from_pretrained(backbone_ref.path)
            if settings.bidirectional:
                # rebuilt from its dict, not set afterwards: the config's own post-init adapts the attention window
                # to the flag (centred on each token)
                if not hasattr(config, "use_bidirectional_attention"):
                    raise UnknownModelError(
                        f"model.bidirectional: {settings.name!r} ({config.model_type}) has no bidirectional "
                        "attention switch (use_bidirectional_attention, which Gemma 3 has); set it false")
                config = type(config).from_dict({**config.to_dict(), "use_bidirectional_attention": True})
        except OSError as err:
            hint = " (the hub is unreachable or HF_HUB_OFFLINE=1: use a local directory or a packaged name)" \
                if backbone_ref.path == settings.name and not Path(settings.name).exists() else ""
            raise UnknownModelError(f"could not load model {settings.name!r}{hint}: {err}") from err
        # RoPE base, attention window, length limit: on the config before the weights load (the rotary tables and
        # masks are built from it), so training, evaluation, serving and export all see the same model.
        apply_long_context(config, settings, settings.name)
        keep_first_layers(config, settings.num_layers, settings.name)
        try:
            # The weights are loaded in settings.dtype whatever the checkpoint's own (a merged export, a hub model);
            # under an active ZeRO-3 HfDeepSpeedConfig (ray_e5.train.engines.zero3_load) this partitions at load.
            with quiet_cut_layers(settings.num_layers):
                model = AutoModel.from_pretrained(backbone_ref.path, config=config, dtype=DTYPES[settings.dtype])
        except OSError as err:
            raise UnknownModelError(f"could not load model {settings.name!r}: {err}") from err
        if settings.pooling is None:
            settings = settings.model_copy(update={"pooling": _natural_pooling(backbone_ref, model.config)})
        if tokenizer.pad_token_id is None:
            tokenizer.pad_token = tokenizer.eos_token or tokenizer.unk_token
        if settings.gradient_checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            model.config.use_cache = False
        if settings.lora is not None:
            from ray_e5.model.lora import add_lora

            model = add_lora(model, settings.lora)
        model.eval()
        return cls(model, tokenizer, settings, backbone_ref.reference)

    # ---- properties --------------------------------------------------------------------------------------
    def _base_model(self) -> torch.nn.Module:
        model = self.backbone
        return model.get_base_model() if hasattr(model, "get_base_model") else model

    @property
    def name(self) -> str:
        return self.base_reference

    @property
    def dimension(self) -> int:
        return int(self._base_model().config.hidden_size)

    @property
    def dtype(self) -> torch.dtype:
        """The dtype the backbone's weights are held in (``settings.dtype`` as loaded); vectors are float32."""
        return next(self.backbone.parameters()).dtype

    @property
    def device(self) -> torch.device:
        return next(self.backbone.parameters()).device

    @property
    def append_eos(self) -> bool:
        """EOS is appended exactly when the vector is read from the last token."""
        return self.settings.pooling == "last"

    # ---- text -> tensors ---------------------------------------------------------------------------------
    def format(self, texts: Sequence[str], instruction: str | None = None) -> list[str]:
        """Apply the instruction template (queries); ``instruction=None`` leaves documents as they are."""
        texts = check_texts(texts)
        return [format_query(t, instruction, self.settings.instruction_template) for t in texts]

    def token_ids(self, texts: Sequence[str], instruction: str | None = None) -> list[list[int]]:
        return token_ids(self.tokenizer, self.format(texts, instruction), self.settings.max_length, self.append_eos)

    def token_counts(self, texts: Sequence[str], instruction: str | None = None) -> list[int]:
        """Tokens each input uses after formatting and truncation, EOS included."""
        return [len(x) for x in self.token_ids(texts, instruction)]

    def tokenize(self, texts: Sequence[str], instruction: str | None = None, padding_side: str = "right") -> dict[str, torch.Tensor]:
        return pad(self.token_ids(texts, instruction), self.tokenizer.pad_token_id, padding_side)

    # ---- forward -----------------------------------------------------------------------------------------
    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, position_ids: torch.Tensor | None = None) -> torch.Tensor:
        """Embeddings of a tokenised batch, with gradients when the caller enables them."""
        kwargs = {"input_ids": input_ids, "attention_mask": attention_mask}
        if position_ids is not None and self._takes_position_ids:
            kwargs["position_ids"] = position_ids
        if self._takes_use_cache:
            kwargs["use_cache"] = False
        hidden = self.backbone(**kwargs).last_hidden_state
        vectors = pool(hidden, attention_mask, self.settings.pooling)  # float32 whatever the model's dtype
        return F.normalize(vectors, dim=-1) if self.settings.normalize else vectors

    @torch.inference_mode()
    def encode(self, texts: Sequence[str], instruction: str | None = None, batch_size: int = 32,
               padding_side: str = "right") -> np.ndarray:
        """Vectors for ``texts`` as float32, shape (len(texts), dimension).

        Texts are embedded in length-sorted batches to cut padding; results return in input order.
        """
        ids = self.token_ids(texts, instruction)
        out = np.zeros((len(ids), self.dimension), dtype=np.float32)
        if not ids:
            return out
        was_training = self.training
        self.eval()
        order = sorted(range(len(ids)), key=lambda i: len(ids[i]), reverse=True)
        device = self.device
        for start in range(0, len(order), batch_size):
            chunk = order[start:start + batch_size]
            batch = pad([ids[i] for i in chunk], self.tokenizer.pad_token_id, padding_side)
            batch = {k: v.to(device) for k, v in batch.items()}
            out[chunk] = self(**batch).cpu().numpy()
        self.train(was_training)
        return out

    # ---- persistence -------------------------------------------------------------------------------------
    def describe(self) -> dict[str, Any]:
        """The ray_e5.json content: everything needed to rebuild this embedder besides the weights."""
        fields = self.settings.model_dump(exclude={"name", "gradient_checkpointing"})
        out = {"format": 1, "base_model": self.base_reference, **fields, "append_eos": self.append_eos,
               "dimension": self.dimension}
        if self.inference:
            out[INFERENCE_KEY] = dict(self.inference)
        return out

    def save(self, directory: str | Path) -> Path:
        """Write, for a LoRA model, the adapter, then ``ray_e5.json`` listing it (the manifest, written last and
        renamed into place); the base model is referenced, not copied."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        if hasattr(self.backbone, "peft_config"):
            self.backbone.save_pretrained(directory / ADAPTER_DIR)
        # revision: new at every save, so that a copy cached by URI and listing (storage.local_copy) is never
        # taken for a newer save whose files happen to have the same sizes and modification second
        manifest = {**self.describe(), "files": manifest_files(directory), "revision": uuid.uuid4().hex}
        tmp = directory / f"{EMBEDDER_FILE}.tmp"
        tmp.write_text(json.dumps(manifest, indent=2) + "\n")
        tmp.replace(directory / EMBEDDER_FILE)
        return directory


def rewrite_manifest(directory: str | Path, **updates: Any) -> dict:
    """Update keys of an embedder directory's ``ray_e5.json`` (``inference``, ...) and list its files again (files
    added since, such as the model card), written last and renamed into place as :meth:`Embedder.save` does."""
    directory = Path(directory)
    saved = json.loads((directory / EMBEDDER_FILE).read_text())
    saved.update(updates, revision=uuid.uuid4().hex)
    saved["files"] = manifest_files(directory)
    tmp = directory / f"{EMBEDDER_FILE}.tmp"
    tmp.write_text(json.dumps(saved, indent=2) + "\n")
    tmp.replace(directory / EMBEDDER_FILE)
    return saved
