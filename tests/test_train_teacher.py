"""The distillation teacher's kept vectors: the same vectors as the teacher's own, each text embedded once."""

from __future__ import annotations

import numpy as np

from ray_e5.model import Embedder
from ray_e5.train.teacher import TeacherVectors


class _Counting:
    """The packaged MiniLM, counting the texts it is asked to embed."""

    def __init__(self, embedder):
        self.embedder, self.dimension, self.embedded = embedder, embedder.dimension, 0

    def encode(self, texts, batch_size=64):
        self.embedded += len(texts)
        return self.embedder.encode(texts, batch_size=batch_size)


def test_teacher_vectors_are_the_teachers_and_each_text_is_embedded_once():
    minilm = Embedder.load("minilm-l6")
    teacher = _Counting(minilm)
    kept = TeacherVectors(teacher)
    first = ["A man plays a guitar.", "Rates for a savings account", "A man plays a guitar."]
    second = ["Rates for a savings account", "A cat sleeps on the sofa.", "A man plays a guitar."]

    a, b = kept.encode(first), kept.encode(second)

    # six texts asked for, three distinct: each embedded once, a duplicate within a call included
    assert teacher.embedded == 3 and len(kept.kept) == 3
    direct = minilm.encode(first + second)
    np.testing.assert_allclose(np.concatenate([a, b]), direct, atol=1e-5)
    assert np.linalg.norm(a, axis=1).min() > 0.5  # real vectors, not the zeros the output starts as
    assert kept.encode([]).shape == (0, minilm.dimension)


def test_teacher_vectors_past_the_cap_are_embedded_again_and_still_returned():
    teacher = _Counting(Embedder.load("minilm-l6"))
    kept = TeacherVectors(teacher, max_bytes=teacher.dimension * 4)  # room for one vector
    out = kept.encode(["one text", "another text"])
    again = kept.encode(["one text", "another text"])
    assert len(kept.kept) == 1 and teacher.embedded == 3  # the one that did not fit is embedded again
    np.testing.assert_allclose(out, again, atol=1e-5)
    assert np.linalg.norm(again, axis=1).min() > 0.5
