"""The paper's instruction table and how the encoder applies it: queries only for retrieval, every input otherwise."""

from __future__ import annotations

import numpy as np
import pytest

from ray_e5.evaluate.encoder import E5Encoder, wants_instructions
from ray_e5.evaluate.instructions import (PAPER_INSTRUCTIONS, STS, TYPE_FALLBACKS, instructs_documents,
                                      table_instruction, task_instruction)
from ray_e5.evaluate.local_tasks import load_local_task
from ray_e5.evaluate.worker import run_task
from ray_e5.testing.tasks import toy_tasks
from ray_e5.model import Embedder


def test_table_names_aliases_and_versions():
    scifact = "Given a scientific claim, retrieve documents that support or refute the claim"
    assert table_instruction("SciFact") == scifact
    assert table_instruction("scifact") == scifact  # the ../shared/data folder name
    assert table_instruction("HotpotQAHardNegatives") == PAPER_INSTRUCTIONS["HotpotQA"]
    assert table_instruction("ArxivClusteringP2P.v2") == PAPER_INSTRUCTIONS["ArxivClusteringP2P"]
    assert table_instruction("CQADupstackGamingRetrieval").startswith("Given a question, retrieve detailed")
    assert table_instruction("banking77") == "Given a online banking query, find the corresponding intents"
    assert table_instruction("NoSuchTask") is None


def test_lookup_order_override_table_hint_fallback():
    # the table beats the task's own hint; an override beats both
    assert task_instruction("SciFact", "Retrieval", hint="a hint") == PAPER_INSTRUCTIONS["SciFact"]
    assert task_instruction("SciFact", "Retrieval", overrides={"SciFact": "mine"}) == "mine"
    assert task_instruction("my_claims", "Retrieval", hint="Given a claim, find evidence") == "Given a claim, find evidence"
    assert task_instruction("STS12", "STS") == STS
    assert task_instruction("mrpc", "PairClassification") == TYPE_FALLBACKS["PairClassification"]
    assert task_instruction("something", "UnheardOfType") == STS
    assert not instructs_documents("Retrieval") and not instructs_documents("Reranking")
    assert instructs_documents("STS") and instructs_documents("Classification") and instructs_documents("BitextMining")


class Recording:
    """A real Embedder that also records which instruction each encode call used."""

    def __init__(self, embedder: Embedder):
        self.embedder, self.calls = embedder, []
        self.name, self.settings = embedder.name, embedder.settings

    @property
    def dimension(self):
        return self.embedder.dimension

    def encode(self, texts, instruction=None, batch_size=32):
        self.calls.append((list(texts), instruction))
        return self.embedder.encode(texts, instruction=instruction, batch_size=batch_size)


@pytest.fixture(scope="module")
def toys(tmp_path_factory):
    return toy_tasks(tmp_path_factory.mktemp("toys"), ["toy_retrieval", "toy_sts"])


def test_retrieval_queries_get_the_instruction_documents_none(tiny_decoder_dir, toys):
    model = Recording(Embedder.load(str(tiny_decoder_dir)))
    assert wants_instructions(model)  # last-token pooling: instructions on by default
    record = run_task(E5Encoder(model, "tiny"), load_local_task(toys["toy_retrieval"]))
    assert record["status"] == "ok", record.get("error")
    hint = "Given a sentence, retrieve the same sentence"  # task.json instruction_hint, not in the paper table
    assert record["instructions"] == {"query": hint, "document": None}
    by_instruction = {instr: texts for texts, instr in model.calls}
    assert set(by_instruction) == {hint, None}
    assert len(by_instruction[hint]) == 8 and len(by_instruction[None]) == 12  # 8 queries, 12 documents


def test_sts_instruction_on_every_input_and_changes_vectors(tiny_decoder_dir, toys):
    model = Recording(Embedder.load(str(tiny_decoder_dir)))
    record = run_task(E5Encoder(model, "tiny"), load_local_task(toys["toy_sts"]))
    assert record["status"] == "ok"
    assert {instr for _, instr in model.calls} == {STS}
    texts = model.calls[0][0][:2]
    with_instr = model.embedder.encode(texts, instruction=STS)
    plain = model.embedder.encode(texts)
    assert not np.allclose(with_instr, plain, atol=1e-4)  # the instruction really reaches the model


def test_instructions_off_and_model_meta(tiny_decoder_dir, toys):
    model = Recording(Embedder.load(str(tiny_decoder_dir)))
    encoder = E5Encoder(model, "tiny", use_instructions=False)
    run_task(encoder, load_local_task(toys["toy_sts"]))
    assert {instr for _, instr in model.calls} == {None}
    meta = encoder.mteb_model_meta
    assert meta.name == "ray-e5/tiny" and meta.embed_dim == 64
    assert meta.similarity_fn_name.value == "cosine" and meta.use_instructions is False


def test_every_mteb_english_task_has_the_papers_instruction():
    """The paper's 56 MTEB English tasks: each non-STS task is in the table; STS tasks share the STS instruction."""
    from ray_e5.evaluate.tasks import benchmark_tasks

    specs = benchmark_tasks("MTEB(eng, v1)")
    assert len(specs) == 56
    for spec in specs:
        instruction = task_instruction(spec.name, spec.type, spec.task.metadata.prompt)
        if spec.type == "STS":
            assert instruction == STS, spec.name
        else:
            assert instruction == table_instruction(spec.name) and instruction, spec.name
    assert {s.name: s.task.hf_subsets for s in specs}["STS17"] == ["en-en"]  # the benchmark's filtering is kept
