"""Passkey retrieval (E5-mistral section 5.2): the documents, the scoring (1.0 when the key is seen, chance when
truncated before it), the config, and the report's passkey, per-language and width sections."""

from __future__ import annotations

import json
import re
import zlib
from types import SimpleNamespace

import numpy as np
import pytest

from ray_e5.config import ConfigError, load_config
from ray_e5.evaluate.config import TaskEntry
from ray_e5.evaluate.passkey import (FILLER, PasskeyTask, build_documents, needle, query, token_counter,
                                 top1_accuracy)


@pytest.fixture(scope="module")
def tokenizer():
    from ray_e5.testing.models import build_tokenizer

    return build_tokenizer()


class HashingEncoder:
    """A bag-of-words encoder with the Embedder's interface: it reads the first ``max_length`` tokens of a text
    (BOS and EOS count, as the Embedder's do), hashes the set of words it sees, normalises."""

    def __init__(self, tokenizer, max_length: int, dimension: int = 1 << 16):
        self.tokenizer = tokenizer
        self.settings = SimpleNamespace(max_length=max_length, pooling="mean")
        self.name = f"hashing-{max_length}"
        self.dimension = dimension
        self.seen_tokens: list[int] = []

    def encode(self, texts, instruction=None, batch_size=32):
        out = np.zeros((len(texts), self.dimension), dtype=np.float32)
        for i, text in enumerate(texts):
            ids = self.tokenizer(text, add_special_tokens=False)["input_ids"][: self.settings.max_length - 2]
            self.seen_tokens.append(len(ids))
            for word in set(re.findall(r"\w+", self.tokenizer.decode(ids).lower())):
                out[i, zlib.crc32(word.encode()) % self.dimension] = 1.0
        return out / np.maximum(np.linalg.norm(out, axis=1, keepdims=True), 1e-12)


def _encoder(model, use_instructions=False):
    from ray_e5.evaluate.encoder import E5Encoder

    return E5Encoder(model, model.name, use_instructions)


# ---- the documents -----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("length", [160, 400, 1024])
def test_documents_have_the_target_length_the_key_at_its_depth_and_are_seeded(tokenizer, length):
    count = token_counter(SimpleNamespace(tokenizer=tokenizer))
    per_sentence = count([" ".join(FILLER)])[0] / len(FILLER)
    for depth in (0.0, 0.25, 0.5, 1.0):
        docs = build_documents(count, length, 6, seed=3, depth=depth)
        for doc in docs:
            assert count([doc.text])[0] == doc.tokens
            assert length - 2 - 2 * per_sentence - 1 <= doc.tokens <= length - 2  # fits with BOS + EOS
            assert doc.text.count(needle(doc.name, doc.key)) == 1
            assert doc.text[doc.needle_start:].startswith(needle(doc.name, doc.key))
            # the depth is where the key sits among the filler: 0 first, 1 last (a sentence of slack each way)
            filler_tokens = doc.tokens - count([needle(doc.name, doc.key)])[0]
            assert abs(doc.needle_token - depth * filler_tokens) <= per_sentence + 2
        assert len({d.name for d in docs}) == len({d.key for d in docs}) == 6
        assert all(re.fullmatch(r"\d{5}", d.key) for d in docs)
    random_depths = build_documents(count, length, 10, seed=3)
    assert [d.text for d in random_depths] == [d.text for d in build_documents(count, length, 10, seed=3)]
    assert [d.text for d in random_depths] != [d.text for d in build_documents(count, length, 10, seed=4)]
    depths = [d.depth for d in random_depths]
    assert min(depths) < 0.3 and max(depths) > 0.7  # drawn over the whole document


def test_documents_without_a_tokenizer_use_an_estimate():
    count = token_counter(SimpleNamespace())
    docs = build_documents(count, 512, 3, seed=0, depth=0.5)
    assert all(480 <= d.tokens <= 510 for d in docs)


def test_top1_accuracy_shares_ties():
    q = np.eye(4, dtype=np.float32)
    assert top1_accuracy(q, q) == 1.0
    assert top1_accuracy(q, np.ones((4, 4), dtype=np.float32)) == pytest.approx(0.25)  # all tied: chance
    d = np.eye(4, dtype=np.float32)[[1, 0, 2, 3]]
    assert top1_accuracy(q, d) == pytest.approx(0.5)


# ---- the scoring -------------------------------------------------------------------------------------------------
def test_a_model_that_sees_the_key_scores_one_and_one_truncated_before_it_scores_chance(tokenizer):
    lengths = [160, 256, 512]
    task = PasskeyTask(lengths=lengths, samples=8, seed=1)
    seeing = HashingEncoder(tokenizer, max_length=512)
    record = task.run(_encoder(seeing))
    assert record["status"] == "ok" and record["type"] == "Passkey" and record["main_score"] == "accuracy"
    pk = record["passkey"]
    assert pk["accuracy"] == {str(n): 1.0 for n in lengths} and record["score"] == 1.0
    assert pk["chance"] == pytest.approx(1 / 8) and pk["truncated"] == {str(n): False for n in lengths}
    assert all(n - 20 <= pk["doc_tokens"][str(n)] <= n - 2 for n in lengths)
    assert max(seeing.seen_tokens) <= 510  # the whole document was read, within max_length

    # keys deep in the document, a model that stops reading before them: every document looks the same
    deep = PasskeyTask(lengths=[256, 512], samples=8, seed=1, depth=0.9)
    blind = deep.run(_encoder(HashingEncoder(tokenizer, max_length=96)))
    assert blind["passkey"]["accuracy"] == {"256": pytest.approx(1 / 8), "512": pytest.approx(1 / 8)}
    assert blind["passkey"]["truncated"] == {"256": True, "512": True}
    # reading exactly up to the key at one length and not at the other
    half = deep.run(_encoder(HashingEncoder(tokenizer, max_length=256)))
    assert half["passkey"]["accuracy"] == {"256": 1.0, "512": pytest.approx(1 / 8)}
    # the query instruction reaches the query only, when instructions are on
    assert half["instructions"] == {"query": None, "document": None}
    assert deep.run(_encoder(HashingEncoder(tokenizer, 600), True))["instructions"]["query"]


def test_passkey_with_the_tiny_decoder_embedder(tiny_decoder_dir):
    """The real Embedder path: its own tokenizer builds the documents, its max_length truncates them."""
    from ray_e5.model import Embedder

    embedder = Embedder.load(str(tiny_decoder_dir), max_length=160)
    record = PasskeyTask(lengths=[160, 400], samples=4, seed=0, depth=0.95).run(_encoder(embedder, True))
    pk = record["passkey"]
    assert record["status"] == "ok" and pk["truncated"] == {"160": False, "400": True}
    assert pk["accuracy"]["400"] == pytest.approx(0.25)  # truncated before every key: chance, exactly
    assert record["dimension"] == embedder.dimension and pk["max_length"] == 160
    with pytest.raises(ValueError, match="cannot hold the hidden sentence"):
        PasskeyTask(lengths=[40], samples=2).evaluate(embedder)


def test_passkey_config_entries():
    entry = TaskEntry(type="passkey", lengths=[256, 512])
    assert entry.path is None and entry.lengths == [256, 512]
    from ray_e5.evaluate.tasks import resolve_tasks

    spec = resolve_tasks([TaskEntry(type="passkey")])[0]
    assert (spec.name, spec.type, spec.task.lengths, spec.task.samples) == ("Passkey", "Passkey",
                                                                            [256, 512, 1024, 2048, 4096], 10)
    assert spec.text_chars() > 0
    other = resolve_tasks([TaskEntry(type="passkey", lengths=[256], max_samples=4)])[0]
    assert other.fingerprint != spec.fingerprint
    for bad, key in [({"type": "passkey", "lengths": [8]}, "at least 32"),
                     ({"type": "passkey", "lengths": []}, "at least 32"),
                     ({"type": "passkey", "path": "x"}, "no `path`"),
                     ({"type": "passkey", "max_samples": 1}, "at least 2"),
                     ({"type": "passkey", "depth": 1.5}, "depth"),
                     ({"path": "x", "lengths": [256]}, "belong to `type: passkey`"),
                     ({"type": "needle"}, "type")]:
        with pytest.raises(ConfigError, match=key):
            load_config(None, [f"evaluate.tasks={json.dumps([bad])}"])
    with pytest.raises(ConfigError, match="evaluate.dimensions"):
        load_config(None, ["evaluate.dimensions=[64, 64]"])
    with pytest.raises(ConfigError, match="evaluate.dimensions"):
        load_config(None, ["evaluate.dimensions=[0]"])


def test_query_names_the_person():
    assert query("Malayah Graves") == "What is Malayah Graves's pass key?"


# ---- the stage and the report ------------------------------------------------------------------------------------
def test_stage_reports_passkey_languages_and_widths(ray_cluster, tiny_decoder_dir, tmp_path):
    from ray_e5.evaluate.run import evaluate
    from ray_e5.testing.tasks import toy_tasks

    toys = toy_tasks(tmp_path / "toys", ["toy_bitext", "toy_sts"])
    data = {"run_dir": str(tmp_path / "run"),
            "evaluate": {"models": [{"label": "tiny", "model": str(tiny_decoder_dir), "instructions": False},
                                    {"label": "tiny-short", "model": str(tiny_decoder_dir), "max_length": 48,
                                     "instructions": False}],
                         "tasks": [str(toys["toy_bitext"]), str(toys["toy_sts"]),
                                   {"type": "passkey", "lengths": [160, 320], "max_samples": 4, "depth": 0.95}],
                         "dimensions": [16, 32], "cpus_per_worker": 1, "torch_threads": 1}}
    report = evaluate(load_config(None, [f"{k}={json.dumps(v)}" for k, v in data.items()])).report
    out = tmp_path / "run" / "eval"
    assert not report["errors"]
    labels = [m["label"] for m in report["models"]]
    assert labels == ["tiny", "tiny@16", "tiny@32", "tiny-short", "tiny-short@16", "tiny-short@32"]

    # passkey: accuracy per length and model; the model cut at 48 tokens cannot see the key at 160: chance
    pk = report["passkey"]["Passkey"]
    assert pk["lengths"] == [160, 320] and pk["chance"] == pytest.approx(0.25)
    assert pk["accuracy"]["tiny-short"] == {"160": pytest.approx(0.25), "320": pytest.approx(0.25)}
    assert pk["truncated"]["tiny-short"] == {"160": True, "320": True} and pk["truncated"]["tiny"]["320"] is False
    assert "Passkey" not in report["categories"]["tiny"]  # a diagnostic, outside the MTEB averages
    assert report["average"]["tiny"] == pytest.approx(np.mean([report["scores"]["tiny"][t]
                                                               for t in ("toy_bitext", "toy_sts")]))
    # per-language rows of the bitext task (two language pairs), the BitextMining column
    langs = report["languages"]["toy_bitext"]
    assert langs["subsets"] == ["deu-eng", "fra-eng"] and langs["category"] == "BitextMining"
    assert langs["scores"]["tiny"] == {"deu-eng": pytest.approx(100.0), "fra-eng": pytest.approx(100.0)}
    assert "toy_sts" not in report["languages"]  # one subset: no per-language table
    # widths: one row per base model, the full width measured from the model
    widths = report["widths"]["tiny"]
    assert {k: v["dimension"] for k, v in widths.items()} == {"full": 64, "16": 16, "32": 32}
    assert widths["16"]["average"] == report["average"]["tiny@16"]
    rec = json.loads((out / "results" / "tiny_16" / "toy_sts.json").read_text())
    assert rec["dimension"] == 16

    md = (out / "report.md").read_text()
    # toy_bitext is German-English, so the English average stands beside the average
    assert "| Model | Average | English average | Classification | Clustering | PairClassification | Reranking | " \
           "Retrieval | STS | Summarization | BitextMining |" in md
    assert "## Passkey retrieval: Passkey" in md and "| tiny-short | 48 | " in md
    assert "## By language: toy_bitext (BitextMining)" in md and "| deu-eng | deu, eng |" in md
    assert "## Score against width" in md and "| Model | 16 | 32 | full |" in md
    for png in ("scores.png", "passkey.png", "widths.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert set(report["paths"]) >= {"passkey_png", "widths_png"}
    saved = json.loads((out / "report.json").read_text())
    assert saved["passkey"]["Passkey"]["accuracy"] == pk["accuracy"]

    # a rerun reuses every record, passkey included; the worker loaded each model once for all its widths
    again = evaluate(load_config(None, [f"{k}={json.dumps(v)}" for k, v in data.items()])).report
    assert again["ran"] == [] and len(again["cached"]) == 18
    pids = {json.loads(p.read_text())["pid"] for p in (out / "results").rglob("*.json")}
    assert len(pids) == 1


def test_truncated_model_renormalises_and_refuses_a_wider_cut(tokenizer):
    from ray_e5.evaluate.encoder import TruncatedModel

    class Dense(HashingEncoder):
        def encode(self, texts, instruction=None, batch_size=32):
            rows = [np.random.default_rng(zlib.crc32(t.encode())).normal(size=self.dimension) for t in texts]
            return np.stack([r / np.linalg.norm(r) for r in rows]).astype(np.float32)

    full = Dense(tokenizer, 64, dimension=256)
    cut = TruncatedModel(full, 32)
    vectors = cut.encode(["a man plays a guitar", "the sky is blue"])
    assert vectors.shape == (2, 32) and cut.dimension == 32 and cut.settings is full.settings
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)
    ref = full.encode(["a man plays a guitar"])[0, :32]
    np.testing.assert_allclose(vectors[0], ref / np.linalg.norm(ref), atol=1e-6)
    with pytest.raises(ValueError, match="evaluate.dimensions: 512 .* 256 dimensions"):
        TruncatedModel(full, 512)
