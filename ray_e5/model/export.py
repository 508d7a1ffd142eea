"""Export an embedder as one merged model directory that sentence-transformers (and vLLM) load unchanged.

The LoRA adapter is merged into the base weights; the directory gets the sentence-transformers module files
(Transformer -> Pooling -> Normalize). Two details keep the vectors identical to ours:
- the tokenizer's post-processor is rewritten to append EOS (sentence-transformers tokenises with the tokenizer
  alone, and last-token pooling must read EOS); the tokenizers library applies post-processing after truncation,
  so truncation keeps EOS as ours does;
- padding is on the right, so that position ids (which plain HF forwards derive from the sequence index, not from
  the attention mask) are those of an unpadded text.

The export uses the settings the run scored the embedder with (its ``inference`` block: max length above all), so
``max_seq_length`` is the length the reported scores were measured at, and writes the model card (README.md, see
:mod:`ray_e5.model.card`) beside the weights.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

from ray_e5.model.embedder import Embedder

_POOLING_FLAGS = {"last": "pooling_mode_lasttoken", "mean": "pooling_mode_mean_tokens", "cls": "pooling_mode_cls_token"}


def _append_eos_post_processor(tokenizer) -> None:
    """Make the fast tokenizer add ``[BOS] text EOS`` itself (BOS only where the model used one)."""
    from tokenizers import processors

    probe = tokenizer("a", add_special_tokens=True)["input_ids"]
    bos = tokenizer.bos_token if tokenizer.bos_token_id is not None and probe[:1] == [tokenizer.bos_token_id] else None
    eos = tokenizer.eos_token
    single = (f"{bos} " if bos else "") + f"$A {eos}"
    pair = (f"{bos} " if bos else "") + f"$A {eos} $B:1 {eos}:1"
    specials = [(eos, tokenizer.eos_token_id)] + ([(bos, tokenizer.bos_token_id)] if bos else [])
    tokenizer.backend_tokenizer.post_processor = processors.TemplateProcessing(single=single, pair=pair,
                                                                             special_tokens=specials)


def export_sentence_transformers(source: str | Path | Embedder, output: str | Path, model_id: str | None = None,
                                 run_dir: str | None = None, card: bool = True) -> Path:
    """Write a merged sentence-transformers model of ``source`` (an Embedder, anything Embedder.load takes, or
    the URI of an embedder directory: ``s3://bucket/run/embedder``, copied to the local cache first), with its model
    card (``README.md``; ``model_id``: the Hub repo its snippets load; ``run_dir``: where the eval report and the
    training records are, by default the embedder's own run when it is ``<run_dir>/embedder``)."""
    source_ref = None if isinstance(source, Embedder) else str(source)
    if isinstance(source, Embedder):
        embedder = source
    else:
        ref = str(source)
        if "://" in ref:
            from ray_e5 import storage

            storage.check_access(ref, "embedder")
            ref = storage.local_copy(ref)
        embedder = Embedder.load(ref, merge_lora=True)
    backbone = embedder.backbone
    if hasattr(backbone, "merge_and_unload"):  # merge a copy: the caller's Embedder stays as it was
        backbone = copy.deepcopy(backbone).merge_and_unload()
    output = Path(output)
    output.mkdir(parents=True, exist_ok=True)
    backbone.save_pretrained(output)

    tokenizer = copy.deepcopy(embedder.tokenizer)
    if embedder.append_eos:
        _append_eos_post_processor(tokenizer)
    tokenizer.padding_side = "right"
    tokenizer.save_pretrained(output)

    settings = embedder.settings
    pooling = {flag: False for flag in _POOLING_FLAGS.values()}
    pooling[_POOLING_FLAGS[settings.pooling]] = True
    pooling.update({"word_embedding_dimension": embedder.dimension, "include_prompt": True})
    (output / "1_Pooling").mkdir(exist_ok=True)
    (output / "1_Pooling" / "config.json").write_text(json.dumps(pooling, indent=2))
    modules = [{"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
               {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"}]
    if settings.normalize:
        (output / "2_Normalize").mkdir(exist_ok=True)
        modules.append({"idx": 2, "name": "2", "path": "2_Normalize", "type": "sentence_transformers.models.Normalize"})
    (output / "modules.json").write_text(json.dumps(modules, indent=2))
    (output / "sentence_bert_config.json").write_text(
        json.dumps({"max_seq_length": settings.max_length, "do_lower_case": False}, indent=2))
    (output / "config_sentence_transformers.json").write_text(json.dumps({
        "similarity_fn_name": "cosine",
        "prompts": {},
        "default_prompt_name": None,
        "ray_e5": {"instruction_template": settings.instruction_template,
                   "inference": {**getattr(embedder, "inference", {}), "max_length": settings.max_length},
                   "note": "queries: format with the template; documents: as they are"},
    }, indent=2))
    if card:
        from ray_e5.model.card import write_model_card

        write_model_card(output, embedder, source_ref, run_dir=run_dir, model_id=model_id)
    return output
