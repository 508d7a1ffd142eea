"""Model and dataset cards, Hub uploads up to the network call, and the inference settings a run was scored with.

Everything is real (a tiny LoRA embedder saved and exported, huggingface_hub's card classes parsing what we wrote,
the real evaluate report builder for eval/report.json) except HfApi's two methods that would reach the Hub: they
record what they were called with.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from ray_e5.config import LoraSettings
from ray_e5.model import Embedder

TRAIN_LENGTH, SCORED_LENGTH = 64, 256


@pytest.fixture
def hub_calls(monkeypatch):
    """HfApi.create_repo / upload_folder replaced by recorders (the only network calls of an upload)."""
    from huggingface_hub import HfApi

    calls = []

    def create_repo(self, repo_id, **kwargs):
        calls.append(("create_repo", repo_id, kwargs))
        return f"https://huggingface.co/{repo_id}"

    def upload_folder(self, **kwargs):
        folder = Path(kwargs["folder_path"])
        calls.append(("upload_folder", kwargs["repo_id"], {**kwargs, "files": sorted(
            p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file())}))
        return "commit"

    monkeypatch.setattr(HfApi, "create_repo", create_repo)
    monkeypatch.setattr(HfApi, "upload_folder", upload_folder)
    return calls


def _trained_run(tiny_decoder_dir, run_dir: Path, inference: dict | None) -> Path:
    """A run directory as train and evaluate leave it: embedder/ (LoRA, trained at 64 tokens, with an inference
    block), train/summary.json, train/data.json and eval/report.json from the real report builder."""
    from ray_e5.evaluate.report import build_report
    from ray_e5.model.embedder import INFERENCE_KEY, rewrite_manifest

    embedder = Embedder.load(str(tiny_decoder_dir), lora=LoraSettings(), max_length=TRAIN_LENGTH)
    with torch.no_grad():
        for name, p in embedder.backbone.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05)
    embedder.save(run_dir / "embedder")
    if inference is not None:
        rewrite_manifest(run_dir / "embedder", **{INFERENCE_KEY: inference})
    (run_dir / "train").mkdir()
    (run_dir / "train" / "summary.json").write_text(json.dumps(
        {"steps": 30, "planned_steps": 30, "stopped_early": False, "seconds": 12.5}))
    (run_dir / "train" / "data.json").write_text(json.dumps({"steps": 30, "batch_size": 8, "sources": {
        "synthetic": {"rows": 300, "valid": 290, "used": 160, "kinds": ["retrieval", "sts"]},
        "sentence-transformers/msmarco": {"rows": 500, "valid": 500, "used": 80, "kinds": ["retrieval"]}}}))
    models = [{"label": "trained", "ref": str(run_dir / "embedder"), "endpoint": None, "dimension": None,
               "parent": None}, {"label": "minilm-l6", "ref": "minilm-l6", "endpoint": None, "dimension": None,
                                 "parent": None}]
    tasks = [{"name": "stsbenchmark", "type": "STS", "main_score": "cosine_spearman", "local": True},
             {"name": "scifact", "type": "Retrieval", "main_score": "ndcg_at_10", "local": True}]
    records = {"trained": {"stsbenchmark": {"status": "ok", "score": 0.7312},
                           "scifact": {"status": "ok", "score": 0.4021}},
               "minilm-l6": {"stsbenchmark": {"status": "ok", "score": 0.8203},
                             "scifact": {"status": "ok", "score": 0.6451}}}
    (run_dir / "eval").mkdir()
    (run_dir / "eval" / "report.json").write_text(json.dumps(build_report(models, tasks, records)))
    return run_dir / "embedder"


def test_export_writes_a_hub_model_card_and_pushes_the_folder(tiny_decoder_dir, tmp_path, hub_calls):
    """`ray-e5 export EMBEDDER -o DIR --push-to-hub REPO`: README.md the Hub parses (base model, eval results from
    eval/report.json), the merged model at the scored length, and one upload of that folder."""
    from huggingface_hub import ModelCard

    from ray_e5.cli import main

    embedder_dir = _trained_run(tiny_decoder_dir, tmp_path / "run",
                                {"max_length": SCORED_LENGTH, "dtype": "fp32", "instructions": False,
                                 "trained_max_length": TRAIN_LENGTH, "source": "evaluate.models[0] (trained)"})
    out = tmp_path / "export"
    assert main(["export", str(embedder_dir), "-o", str(out), "--push-to-hub", "me/tiny-e5"]) == 0

    card = ModelCard.load(out / "README.md")
    assert card.data.library_name == "sentence-transformers"
    assert card.data.pipeline_tag == "sentence-similarity"
    assert card.data.base_model == Path(tiny_decoder_dir).name
    assert "sentence-transformers/msmarco" in card.data.datasets
    results = {r.dataset_name: r for r in card.data.eval_results}
    assert set(results) == {"stsbenchmark", "scifact"}
    assert results["stsbenchmark"].metric_value == pytest.approx(73.12)
    assert results["scifact"].metric_type == "ndcg_at_10"
    assert card.data.model_name == "tiny-e5"
    text = card.text
    assert f"max length: {SCORED_LENGTH} tokens" in text and f"trained at {TRAIN_LENGTH}" in text
    assert "synthetic share of the rows used: 66.7% (160 of 240)" in text
    assert "SentenceTransformer(\"me/tiny-e5\")" in text and "OpenAI(" in text and "from vllm import LLM" in text
    assert json.loads((out / "sentence_bert_config.json").read_text())["max_seq_length"] == SCORED_LENGTH

    assert [c[0] for c in hub_calls] == ["create_repo", "upload_folder"]
    assert hub_calls[0][1] == "me/tiny-e5" and hub_calls[0][2]["repo_type"] == "model"
    upload = hub_calls[1][2]
    assert Path(upload["folder_path"]) == out and upload["repo_type"] == "model"
    assert {"README.md", "model.safetensors", "modules.json", "tokenizer.json"} <= set(upload["files"])


def test_export_without_a_run_still_writes_a_card(tiny_decoder_dir, tmp_path):
    """An embedder outside a run directory gets a card without model-index (nothing was scored), still loadable."""
    from huggingface_hub import ModelCard

    from ray_e5.model.export import export_sentence_transformers

    Embedder.load(str(tiny_decoder_dir), max_length=TRAIN_LENGTH).save(tmp_path / "loose")
    export_sentence_transformers(tmp_path / "loose", tmp_path / "out")
    card = ModelCard.load(tmp_path / "out" / "README.md")
    assert card.data.eval_results is None and card.data.base_model == Path(tiny_decoder_dir).name
    assert f"max length: {TRAIN_LENGTH} tokens" in card.text


def test_served_embedder_uses_the_scored_length_and_dtype_unless_overridden(tiny_decoder_dir, tmp_path):
    """The serve replica's model (serve/app.py's loader) answers at the inference block's 256 tokens and dtype,
    where training used 64 tokens in fp32; serve.max_tokens_per_input and serve.dtype win over both."""
    from ray_e5.serve.app import load_replica_embedder, replica_max_tokens
    from ray_e5.serve.config import ServeSettings

    embedder_dir = str(_trained_run(tiny_decoder_dir, tmp_path / "run",
                                    {"max_length": SCORED_LENGTH, "dtype": "bf16"}))
    assert json.loads((Path(embedder_dir) / "ray_e5.json").read_text())["max_length"] == TRAIN_LENGTH

    settings = ServeSettings()
    served = load_replica_embedder(settings, embedder_dir)
    assert served.settings.max_length == SCORED_LENGTH
    assert replica_max_tokens(settings, served.settings.max_length) == SCORED_LENGTH
    assert served.dtype == torch.bfloat16
    long_text = ["word " * 400]
    assert served.token_counts(long_text) == [SCORED_LENGTH]

    override = ServeSettings(max_tokens_per_input=32, dtype="fp32")
    served = load_replica_embedder(override, embedder_dir)
    assert served.settings.max_length == 32 and served.dtype == torch.float32
    assert replica_max_tokens(override, served.settings.max_length) == 32

    # training keeps its own settings: the inference block is for inference only
    assert Embedder.load(embedder_dir, trainable=True).settings.max_length == TRAIN_LENGTH


def test_training_records_the_recipes_scored_settings():
    """The one-hour recipe scores {run_dir}/embedder at 256 tokens, dtype auto: that is what train publishes in the
    embedder's inference block (what serve and export then use)."""
    from ray_e5.config import load_config
    from ray_e5.recipes import recipe_path
    from ray_e5.train.run import scored_inference

    config = load_config(recipe_path("cpu-1h"), overrides=["run_dir=/tmp/ray-e5-card-run"])
    block = scored_inference(config)
    assert block is not None
    assert block["max_length"] == SCORED_LENGTH and block["dtype"] == "auto" and block["instructions"] is False
    assert block["trained_max_length"] == config.model.max_length != SCORED_LENGTH


def _manifest() -> dict:
    from ray_e5.generate.config import GenerateSettings

    settings = GenerateSettings(contamination_paths=["data/scifact"]).model_dump(mode="json")
    return {"examples": 42, "planned": 64, "written_this_run": 42, "by_kind": {"retrieval": 30, "sts": 12},
            "by_language": {"en": 35, "fr": 7}, "drops": {"invalid_json": 9, "near_duplicate": 5,
                                                          "contaminated": 2},
            "tokens": {"prompt": 12000, "completion": 8000}, "cost_usd": 0.0123, "wall_seconds": 81.2, "runs": 2,
            "backend": "openai", "model": "gpt-4o-mini", "shards": ["part-a-00000.parquet"], "settings": settings}


def test_dataset_card_names_writer_counts_and_filters(tmp_path, hub_calls):
    """synthetic/README.md parses with DatasetCard.load and names the writer, the counts kept and dropped by reason,
    the dedup and contamination settings and the cost; the push uploads the shards and the card, as a dataset."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    from huggingface_hub import DatasetCard

    from ray_e5.generate.card import push_synthetic, write_dataset_card
    from ray_e5.generate.prompts import PROMPT_VERSION

    synthetic = tmp_path / "run" / "synthetic"
    (synthetic / "journal").mkdir(parents=True)
    (synthetic / "journal" / "a.jsonl").write_text("{}\n")
    pq.write_table(pa.table({"query": ["q"], "positive": ["p"]}), synthetic / "part-a-00000.parquet")
    write_dataset_card(str(synthetic), _manifest())

    card = DatasetCard.load(synthetic / "README.md")
    assert card.data.language == ["en", "fr"] and card.data.size_categories == "n<1K"
    assert card.data.configs[0]["data_files"][0]["path"] == "part-*.parquet"
    text = card.text
    for needle in ("`gpt-4o-mini`, backend: `openai`", f"version {PROMPT_VERSION}", "examples kept: 42 of 64",
                   "dropped: 16", "| invalid_json | 9 |", "| near_duplicate | 5 |", "| retrieval | 30 |",
                   "| fr | 7 |", "threshold 0.9", "13-gram overlap with 1 evaluation path(s): data/scifact",
                   "12000 prompt, 8000 completion", "0.0123 USD"):
        assert needle in text, needle

    push_synthetic(str(synthetic), "me/synthetic")
    assert hub_calls[0][1] == "me/synthetic" and hub_calls[0][2]["repo_type"] == "dataset"
    upload = hub_calls[1][2]
    assert upload["repo_type"] == "dataset" and Path(upload["folder_path"]) == synthetic
    assert {"README.md", "part-a-00000.parquet"} <= set(upload["files"])
    assert set(upload["allow_patterns"]) == {"part-*.parquet", "README.md"}  # not journal/, logs, batches


def test_generate_and_export_accept_push_to_hub():
    """The flags checked from outside parse on both commands."""
    from ray_e5.cli import build_parser

    parser = build_parser()
    assert parser.parse_args(["export", "e", "-o", "o", "--push-to-hub", "me/m"]).push_to_hub == "me/m"
    assert parser.parse_args(["generate", "--push-to-hub", "me/d"]).push_to_hub == "me/d"
