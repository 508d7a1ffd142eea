"""Personalised passkey retrieval (E5-mistral, section 5.2): does a model read a whole long document?

For each length L, ``samples`` documents are built, each of about L tokens *with the evaluated model's tokenizer*:
the same filler text ("The grass is green. The sky is blue. ...") with one sentence hidden at a seeded random depth,
``"<name>'s pass key is <key>. Remember it. <key> is the pass key of <name>."``; every document has its own
person and key. Each query asks ``"What is <name>'s pass key?"`` and the candidates are all the documents of that
length, so top-1 accuracy is 1.0 for a model that sees and uses the hidden sentence, and chance (1 / samples) for
one that is truncated before it (every truncated document is the same filler). Ties count fractionally (the
expected accuracy of a random tie-break), so a blind model scores chance exactly, not by luck of the sort.

Config: ``{type: passkey, lengths: [256, 512, 1024, 2048, 4096], max_samples: 10, depth: null, name: Passkey}``
in ``evaluate.tasks``. The record keeps accuracy, document tokens, the measured depth and speed per length; the
report adds a table (length x model) and ``passkey.png`` (accuracy against length, one line per model).
"""

from __future__ import annotations

import os
import random
import time
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any, Callable, Sequence

import numpy as np

FILLER = ["The grass is green.", "The sky is blue.", "The sun is yellow.", "Here we go.", "There and back again."]
FIRST = ["Malayah", "Jonas", "Priya", "Kenji", "Amara", "Lucas", "Sofia", "Mateo", "Ingrid", "Tariq", "Elena", "Omar",
         "Yuki", "Felix", "Nadia", "Hugo", "Leila", "Bruno", "Chiara", "Dmitri", "Aisha", "Rafael", "Greta", "Kwame",
         "Mirela", "Soren", "Imani", "Pavel", "Noor", "Tobias", "Zara", "Anders"]
LAST = ["Graves", "Okafor", "Lindqvist", "Tanaka", "Moreau", "Castillo", "Novak", "Haddad", "Schmidt", "Petrov",
        "Kowalski", "Mendes", "Brennan", "Fujimoto", "Abara", "Rossi", "Dubois", "Nakamura", "Ivanova", "Hughes",
        "Larsen", "Suleiman", "Vargas", "Keller", "Osei", "Marino", "Andersen", "Quinn", "Yilmaz", "Bauer",
        "Costa", "Whitfield"]
DEFAULT_LENGTHS = (256, 512, 1024, 2048, 4096)
DEFAULT_SAMPLES = 10
INSTRUCTION = "Given a question about a person's pass key, retrieve the document that states that person's pass key"
#: tokens left for the specials a model adds around a document (BOS and our EOS), so L-token documents fit L
SPECIAL_TOKENS = 2


def needle(name: str, key: str) -> str:
    return f"{name}'s pass key is {key}. Remember it. {key} is the pass key of {name}."


def query(name: str) -> str:
    return f"What is {name}'s pass key?"


@dataclass
class PasskeyDocument:
    name: str
    key: str
    text: str
    tokens: int  # tokens of the text, no specials
    depth: float  # requested depth (0: first, 1: last)
    needle_start: int  # character offset of the hidden sentence
    needle_token: int  # tokens before the hidden sentence

    @property
    def token_depth(self) -> float:
        """Where the hidden sentence starts, as a fraction of the document's tokens."""
        return self.needle_token / max(1, self.tokens)


def token_counter(model: Any) -> Callable[[Sequence[str]], list[int]]:
    """Token counts (no specials) with the model's tokenizer; about 4 characters a token without one."""
    tokenizer = getattr(model, "tokenizer", None)
    if tokenizer is None:
        return lambda texts: [max(1, len(t) // 4) for t in texts]
    return lambda texts: [len(x) for x in tokenizer(list(texts), add_special_tokens=False)["input_ids"]]


def people(n: int, rng: random.Random) -> list[tuple[str, str]]:
    """``n`` distinct (name, 5-digit key) pairs."""
    if n > len(FIRST) * len(LAST):
        raise ValueError(f"passkey: at most {len(FIRST) * len(LAST)} documents per length")
    names = rng.sample([f"{f} {l}" for f in FIRST for l in LAST], n)
    keys = rng.sample(range(10_000, 100_000), n)
    return [(name, str(key)) for name, key in zip(names, keys)]


def _text(prefix: int, total: int, hidden: str) -> tuple[str, str]:
    before = " ".join(FILLER[i % len(FILLER)] for i in range(prefix))
    after = " ".join(FILLER[i % len(FILLER)] for i in range(prefix, total))
    head = f"{before} " if before else ""
    return head, head + hidden + (f" {after}" if after else "")


def build_document(count: Callable[[Sequence[str]], list[int]], target: int, name: str, key: str,
                   depth: float) -> PasskeyDocument:
    """One document of at most ``target`` tokens (and within one filler sentence of it), the hidden sentence
    after ``depth`` of the filler sentences."""
    hidden = needle(name, key)
    if count([hidden])[0] > target:
        raise ValueError(f"passkey: a document of {target} tokens cannot hold the hidden sentence "
                         f"({count([hidden])[0]} tokens with this tokenizer); use longer `lengths`")
    per_sentence = count([" ".join(FILLER * 4)])[0] / (4 * len(FILLER))
    sentences = max(0, int((target - count([hidden])[0]) / per_sentence))

    def make(k: int) -> tuple[str, str, int]:
        head, text = _text(round(depth * k), k, hidden)
        return head, text, count([text])[0]

    head, text, tokens = make(sentences)
    for _ in range(64):  # walk to the largest sentence count that fits
        if tokens > target and sentences > 0:
            sentences -= max(1, int((tokens - target) / per_sentence))
        elif tokens <= target:
            bigger = make(sentences + 1)
            if bigger[2] > target:
                break
            sentences += 1
            head, text, tokens = bigger
            continue
        else:
            break
        head, text, tokens = make(sentences)
    before = count([head])[0] if head else 0
    return PasskeyDocument(name, key, text, tokens, depth, len(head), before)


def build_documents(count: Callable[[Sequence[str]], list[int]], length: int, samples: int, seed: int,
                    depth: float | None = None) -> list[PasskeyDocument]:
    """The ``samples`` documents of one length (about ``length - SPECIAL_TOKENS`` tokens each), seeded by
    ``seed`` and the length; ``depth=None`` draws each document's depth uniformly from [0, 1]."""
    rng = random.Random(f"passkey:{seed}:{length}")
    target = max(8, length - SPECIAL_TOKENS)
    docs = []
    for name, key in people(samples, rng):
        d = rng.random() if depth is None else float(depth)
        docs.append(build_document(count, target, name, key, d))
    return docs


def top1_accuracy(queries: np.ndarray, documents: np.ndarray, tol: float = 1e-5) -> float:
    """Query i's relevant document is document i; ties at the top share the credit."""
    q = queries / np.maximum(np.linalg.norm(queries, axis=1, keepdims=True), 1e-12)
    d = documents / np.maximum(np.linalg.norm(documents, axis=1, keepdims=True), 1e-12)
    sims = q @ d.T
    best = sims.max(axis=1, keepdims=True)
    tied = sims >= best - tol
    return float(np.mean(np.diag(tied) / tied.sum(axis=1)))


@dataclass
class PasskeyTask:
    """The configured task; ``run`` scores one model and returns a record as :func:`ray_e5.evaluate.worker.run_task`
    does for mteb tasks."""

    name: str = "Passkey"
    lengths: list[int] = field(default_factory=lambda: list(DEFAULT_LENGTHS))
    samples: int = DEFAULT_SAMPLES
    depth: float | None = None
    seed: int = 42
    instruction: str | None = None
    is_passkey = True

    @property
    def metadata(self):
        return SimpleNamespace(name=self.name, type="Passkey", main_score="accuracy")

    def text_chars(self) -> int:
        return 4 * self.samples * sum(self.lengths)

    def evaluate(self, model, use_instructions: bool = True, instruction: str | None = None,
                 batch_size: int = 8) -> dict[str, Any]:
        count = token_counter(model)
        instruction = (instruction or self.instruction or INSTRUCTION) if use_instructions else None
        max_length = getattr(getattr(model, "settings", None), "max_length", None)
        out: dict[str, Any] = {"lengths": list(self.lengths), "documents": self.samples,
                               "chance": 1.0 / self.samples, "max_length": max_length, "accuracy": {},
                               "doc_tokens": {}, "depth": {}, "truncated": {}, "seconds": {}, "texts_per_s": {}}
        for length in self.lengths:
            docs = build_documents(count, length, self.samples, self.seed, self.depth)
            start = time.perf_counter()
            # long documents in small batches: an attention mask that disables fused kernels costs batch x L^2
            d = model.encode([doc.text for doc in docs], instruction=None,
                             batch_size=max(1, min(batch_size, 8192 // length)))
            q = model.encode([query(doc.name) for doc in docs], instruction=instruction, batch_size=batch_size)
            seconds = time.perf_counter() - start
            key = str(length)
            out["accuracy"][key] = round(top1_accuracy(np.asarray(q), np.asarray(d)), 6)
            out["doc_tokens"][key] = round(float(np.mean([doc.tokens for doc in docs])), 1)
            out["depth"][key] = round(float(np.mean([doc.token_depth for doc in docs])), 3)
            out["truncated"][key] = bool(max_length is not None and max(doc.tokens for doc in docs)
                                         + SPECIAL_TOKENS > max_length)
            out["seconds"][key] = round(seconds, 3)
            out["texts_per_s"][key] = round(2 * len(docs) / seconds, 3) if seconds > 0 else None
        return out

    def run(self, encoder, batch_size: int = 8) -> dict[str, Any]:
        """A record for ``encoder`` (an E5Encoder: its model, its instruction choice and overrides)."""
        import traceback

        record: dict[str, Any] = {"task": self.name, "type": "Passkey", "main_score": "accuracy",
                                  "model": encoder.mteb_model_meta.name, "host": os.uname().nodename,
                                  "pid": os.getpid()}
        start = time.perf_counter()
        instruction = encoder.overrides.get(self.name) if getattr(encoder, "overrides", None) else None
        try:
            result = self.evaluate(encoder.model, encoder.use_instructions, instruction, batch_size)
            record.update(status="ok", score=float(np.mean(list(result["accuracy"].values()))), passkey=result,
                          dimension=int(encoder.model.dimension))
        except Exception as err:  # noqa: BLE001 - recorded, the other tasks go on
            record.update(status="error", error=f"task {self.name!r}: {type(err).__name__}: {err}",
                          traceback=traceback.format_exc())
        record["seconds"] = round(time.perf_counter() - start, 3)
        used = (instruction or self.instruction or INSTRUCTION) if encoder.use_instructions else None
        record["instructions"] = {"query": used, "document": None}
        return record
