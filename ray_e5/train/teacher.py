"""The distillation teacher's vectors, kept per text.

A frozen teacher (``train.distill``) embeds a text the same way every time, so a text seen again (a later epoch, an
SNLI premise under several hypotheses, a source planned at weight > 1) needs a look-up, not a forward pass. Once the
frozen-layer cache makes the student's replayed steps cheap, the teacher's forward is a large share of what is left.

Written by hand: ``functools`` caches whole calls, not the items of a batched ``encode``; a vector is 4 bytes per
dimension (1.5 KB for MiniLM), so tens of thousands of texts fit well under ``max_bytes``.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


class TeacherVectors:
    """``teacher.encode`` with each text's vector kept (while ``max_bytes`` allows); ``dimension`` as the teacher's."""

    def __init__(self, teacher, max_bytes: int = 1 << 30):
        self.teacher = teacher
        self.dimension = teacher.dimension
        self.max_bytes = max_bytes
        self.kept: dict[str, np.ndarray] = {}
        self.bytes = 0

    def encode(self, texts: Sequence[str], batch_size: int = 64) -> np.ndarray:
        new = list(dict.fromkeys(t for t in texts if t not in self.kept))
        fresh = dict(zip(new, self.teacher.encode(new, batch_size=batch_size))) if new else {}
        for text, vector in fresh.items():
            if self.bytes + vector.nbytes > self.max_bytes:
                break
            self.kept[text] = vector
            self.bytes += vector.nbytes
        out = np.zeros((len(texts), self.dimension), dtype=np.float32)
        for i, text in enumerate(texts):
            out[i] = fresh[text] if text in fresh else self.kept[text]
        return out
