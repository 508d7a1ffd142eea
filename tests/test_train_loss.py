"""The contrastive loss: InfoNCE with masks, and cross-device negatives equal to one worker with the whole batch."""

from __future__ import annotations

import math

import pytest
import torch

from ray_e5.train.config import TrainSettings
from ray_e5.train.loss import CoSENT, InfoNCE, LossInputs, Matryoshka, ScoreDistillation, SourceLoss, build_loss
from ray_e5.testing.train import spawn, step_gradients


def _loss(**settings):
    """The loss the training loop builds from ``train:`` settings (temperature 0.05 unless given)."""
    return build_loss(TrainSettings(**{"temperature": 0.05, **settings}))


def _unit(rows, dim=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.nn.functional.normalize(torch.randn(rows, dim, generator=g), dim=-1)


def _reference(q, docs, keep, t):
    """Mean over queries of -log softmax(cos/t)[i] over the documents kept for query i (plain Python)."""
    total = 0.0
    for i in range(q.shape[0]):
        logits = [float(q[i] @ docs[j]) / t for j in range(docs.shape[0]) if keep[i][j]]
        own = float(q[i] @ docs[i]) / t
        total += -(own - math.log(sum(math.exp(x) for x in logits)))
    return total / q.shape[0]


def test_info_nce_matches_the_formula_with_masks():
    q, p, n = _unit(4, seed=1), _unit(4, seed=2), _unit(4, seed=3)
    valid = torch.tensor([True, False, True, True])
    fn = torch.zeros(4, 8, dtype=torch.bool)
    fn[0, 2] = fn[3, 5] = True
    loss = InfoNCE(temperature=0.05)(LossInputs(q, p, n, valid, fn))
    docs = torch.cat([p, n])
    keep = [[not fn[i, j] and (j < 4 or bool(valid[j - 4])) for j in range(8)] for i in range(4)]
    assert float(loss) == pytest.approx(_reference(q, docs, keep, 0.05), rel=1e-5)
    # Without masks every document counts, and the loss differs.
    assert float(InfoNCE(0.05)(LossInputs(q, p, n))) != pytest.approx(float(loss), rel=1e-3)
    # In-batch only.
    plain = InfoNCE(temperature=0.05)(LossInputs(q, p))
    assert float(plain) == pytest.approx(_reference(q, p, [[True] * 4] * 4, 0.05), rel=1e-5)


def test_symmetric_info_nce_adds_each_positive_over_the_queries():
    q, p, n = _unit(4, seed=1), _unit(4, seed=2), _unit(4, seed=3)
    fn = torch.zeros(4, 8, dtype=torch.bool)
    fn[0, 2] = True  # query 0's positive equals document 2: query 0 is no negative for document 2
    inputs = LossInputs(q, p, n, torch.ones(4, dtype=torch.bool), fn)
    one_way = float(InfoNCE(0.05)(inputs))
    both = float(InfoNCE(0.05, symmetric=True)(inputs))
    keep_back = [[not fn[j, i] for j in range(4)] for i in range(4)]  # [document i][query j]
    backward = _reference(p, q, keep_back, 0.05)  # each positive's softmax over the queries, no hard negatives
    assert both == pytest.approx((one_way + backward) / 2, rel=1e-5)
    assert backward != pytest.approx(one_way, rel=1e-3)


def _global_batch(size=8):
    return {"query": [f"query number {i} about the fox" for i in range(size)],
            # rows 1 and 7 share a positive (a false negative for each other)
            "positive": [f"positive document {i} quick brown" for i in range(size - 1)] + ["positive document 1 quick brown"],
            "negative": [f"negative {i} lazy dog" if i % 3 else "" for i in range(size)],
            "task": ["Retrieve the matching document"] * size}


def _assert_same(a: dict, b: dict, atol=1e-5):
    assert a["loss"] == pytest.approx(b["loss"], abs=atol)
    assert a["grads"].keys() == b["grads"].keys() and a["grads"]
    for name in a["grads"]:
        torch.testing.assert_close(a["grads"][name], b["grads"][name], rtol=0, atol=atol, msg=name)


def test_two_workers_with_b_equal_one_worker_with_2b(tiny_decoder_dir):
    """Loss and gradients (fp32) of 2 gloo workers x batch 4 with cross-device negatives == 1 worker x batch 8."""
    row = _global_batch(8)
    variants = [(None, False), (3, True)]  # plain, and gradient-cached in chunks of 3
    one = step_gradients(0, 1, str(tiny_decoder_dir), row, {"engine": "torch"}, variants, _loss())
    two = spawn(step_gradients, 2, str(tiny_decoder_dir), row, {"engine": "torch"}, variants, _loss())
    largest = max(float(g.abs().max()) for g in one["runs"][0]["grads"].values())
    assert largest > 0.1  # gradients worth comparing
    for k in range(len(variants)):
        for rank in range(2):
            _assert_same(two[rank]["runs"][k], one["runs"][0])
    # The local tokens differ per worker and sum to the single worker's.
    assert two[0]["runs"][0]["tokens"] + two[1]["runs"][0]["tokens"] == one["runs"][0]["tokens"]


def test_symmetric_loss_two_workers_with_b_equal_one_worker_with_2b(tiny_decoder_dir):
    """The reverse direction too: 2 gloo workers x batch 4 == 1 worker x batch 8, plain and gradient-cached."""
    row = _global_batch(8)
    variants = [(None, False), (3, True)]
    args = (str(tiny_decoder_dir), row, {"engine": "torch"}, variants, _loss(symmetric_loss=True))
    one = step_gradients(0, 1, *args)
    two = spawn(step_gradients, 2, *args)
    one_way = step_gradients(0, 1, *args[:-1], _loss())
    assert one["runs"][0]["loss"] != pytest.approx(one_way["runs"][0]["loss"], rel=1e-3)  # the reverse term counts
    assert max(float(g.abs().max()) for g in one["runs"][0]["grads"].values()) > 0.1
    for k in range(len(variants)):
        for rank in range(2):
            _assert_same(two[rank]["runs"][k], one["runs"][0])


def test_matryoshka_loss_is_the_sum_of_infonce_at_each_truncated_width():
    q, p, n = _unit(4, dim=16, seed=4), _unit(4, dim=16, seed=5), _unit(4, dim=16, seed=6)
    valid = torch.tensor([True, True, False, True])
    dims = [4, 8, 16]
    loss = Matryoshka(InfoNCE(0.05, cross_device=False), dims)(LossInputs(q, p, n, valid))
    expected = 0.0
    for d in dims:  # by hand: cut each vector to its first d components, re-normalise, then the plain formula
        cut = [torch.nn.functional.normalize(x[:, :d], dim=-1) for x in (q, p, n)]
        docs = torch.cat(cut[1:])
        keep = [[j < 4 or bool(valid[j - 4]) for j in range(8)] for _ in range(4)]
        expected += _reference(cut[0], docs, keep, 0.05)
    assert float(loss) == pytest.approx(expected, rel=1e-5)
    full = InfoNCE(0.05, cross_device=False)(LossInputs(q, p, n, valid))
    assert float(full) == pytest.approx(_reference(q, torch.cat([p, n]), keep, 0.05), rel=1e-5)
    assert float(loss) > float(full)  # three widths, each a loss of its own


def test_matryoshka_gradients_are_the_same_with_gradient_caching(tiny_decoder_dir):
    from ray_e5.train.engines import make_engine
    from ray_e5.train.step import prepare, train_step
    from ray_e5.testing.train import lora_embedder, settings

    row = _global_batch(6)
    opts = settings(engine="torch", lr=0.0)
    embedder = lora_embedder(str(tiny_decoder_dir), engine_settings=opts)
    dim = embedder.dimension
    engine = make_engine(embedder, opts, total_steps=10, dtype="fp32", micro_batch=6)
    texts = prepare(row, 0, 1, embedder.settings.instruction_template)
    runs = []
    matryoshka = _loss(matryoshka_dims=[dim // 4, dim // 2, dim])
    for chunk, cache in ((None, False), (2, True)):
        result = train_step(engine, engine.module, texts, matryoshka, chunk_size=chunk, gradient_cache=cache)
        runs.append({"loss": result.loss, "grads": engine.full_gradients(), "tokens": result.tokens})
        engine.step()
    plain = train_step(engine, engine.module, texts, _loss())
    assert runs[0]["loss"] > plain.loss > 0  # the extra widths add their own terms
    _assert_same(runs[1], runs[0])


def _graded_batch(size=8):
    """STS-like pairs with distinct and tied gold scores."""
    return {"query": [f"sentence number {i} about the fox" for i in range(size)],
            "positive": [f"another sentence {i} quick brown" for i in range(size)],
            "negative": [""] * size, "task": ["Retrieve semantically similar text."] * size,
            "score": [float(i % 5) for i in range(size)]}


def test_cosent_matches_the_formula_and_ignores_ties():
    q, p = _unit(5, seed=7), _unit(5, seed=8)
    scores = torch.tensor([4.0, 1.0, 2.5, 1.0, 0.0])
    cosent = CoSENT(scale=1 / 0.05, cross_device=False)
    loss = cosent(LossInputs(q, p, scores=scores))
    cos = [float(q[i] @ p[i]) for i in range(5)]
    terms = [math.exp((cos[j] - cos[i]) / 0.05) for i in range(5) for j in range(5) if scores[i] > scores[j]]
    assert len(terms) == 9  # 10 pairs of pairs, one tie (1.0, 1.0) left out
    assert float(loss) == pytest.approx(math.log(1 + sum(terms)), rel=1e-5)
    # Through the dispatch: a batch with scores is CoSENT, without them InfoNCE.
    source = SourceLoss(InfoNCE(0.05, cross_device=False), cosent)
    assert float(source(LossInputs(q, p, scores=scores))) == pytest.approx(float(loss))
    assert float(source(LossInputs(q, p))) != pytest.approx(float(loss), rel=1e-3)
    # Cosines ranked as the scores rank lose less than the same cosines ranked the other way.
    order = torch.argsort(scores)
    aligned = torch.empty(5)
    aligned[order] = torch.linspace(-0.5, 0.9, 5)
    reversed_ = torch.empty(5)
    reversed_[order] = torch.linspace(0.9, -0.5, 5)
    unit = torch.nn.functional.normalize(torch.ones(5, 2), dim=-1)

    def with_cosines(c):  # pairs (u, v) whose cosine is c
        v = torch.stack([torch.cos(torch.acos(c) + math.pi / 4), torch.sin(torch.acos(c) + math.pi / 4)], dim=-1)
        return LossInputs(unit, v, scores=scores)

    good = float(cosent(with_cosines(aligned)))
    bad = float(cosent(with_cosines(reversed_)))
    assert good < 1.0 < bad


def _cosent_reference(q, p, scores, t):
    """log(1 + sum over pairs i, j with score_i > score_j of exp((cos_j - cos_i) / t)) (plain Python)."""
    cos = [float(q[i] @ p[i]) for i in range(q.shape[0])]
    n = len(cos)
    return math.log(1 + sum(math.exp((cos[j] - cos[i]) / t) for i in range(n) for j in range(n)
                            if scores[i] > scores[j]))


def test_build_loss_gives_the_loss_its_settings_describe():
    """The loss the loop builds from settings, on one fixed batch: InfoNCE plain and symmetric, with false negatives
    masked or not, summed over Matryoshka widths, and CoSENT on a graded batch, each equal to its formula."""
    q, p, n = _unit(4, dim=16, seed=9), _unit(4, dim=16, seed=10), _unit(4, dim=16, seed=11)
    valid = torch.tensor([True, False, True, True])
    fn = torch.zeros(4, 8, dtype=torch.bool)
    fn[1, 3] = fn[2, 0] = True
    scores = torch.tensor([3.0, 0.5, 2.0, 0.5])
    unit = torch.nn.functional.normalize

    def infonce(dims=(16,), masked=True, symmetric=False):
        total = 0.0
        for d in dims:
            qd, pd, nd = (unit(x[:, :d], dim=-1) for x in (q, p, n))
            keep = [[not (masked and fn[i, j]) and (j < 4 or bool(valid[j - 4])) for j in range(8)] for i in range(4)]
            forward = _reference(qd, torch.cat([pd, nd]), keep, 0.05)
            back = _reference(pd, qd, [[not (masked and fn[j, i]) for j in range(4)] for i in range(4)], 0.05)
            total += (forward + back) / 2 if symmetric else forward
        return total

    def cosent(dims=(16,)):
        return sum(_cosent_reference(unit(q[:, :d], dim=-1), unit(p[:, :d], dim=-1), scores, 0.05) for d in dims)

    ranked, graded = LossInputs(q, p, n, valid, fn), LossInputs(q, p, scores=scores)
    cases = [({}, infonce(), cosent()),
             ({"symmetric_loss": True}, infonce(symmetric=True), cosent()),
             ({"mask_false_negatives": False}, infonce(masked=False), cosent()),
             ({"matryoshka_dims": [8, 4]}, infonce((4, 8)), cosent((4, 8))),
             ({"matryoshka_dims": [4, 16], "symmetric_loss": True}, infonce((4, 16), symmetric=True), cosent((4, 16)))]
    for settings, expected_infonce, expected_cosent in cases:
        loss = _loss(**settings)
        assert float(loss(ranked)) == pytest.approx(expected_infonce, rel=1e-5), settings
        assert float(loss(graded)) == pytest.approx(expected_cosent, rel=1e-5), settings
        assert loss.cross_device and loss.backward_scale() == 1.0  # no process group: one worker
    assert len({round(e, 4) for _, e, _ in cases}) == len(cases)  # every setting changes the loss
    assert not _loss(cross_device_negatives=False).cross_device
    assert not _loss(mask_false_negatives=False, matryoshka_dims=[4]).mask_false_negatives


def test_cosent_two_workers_with_b_equal_one_worker_with_2b(tiny_decoder_dir):
    """CoSENT over a global batch split on 2 gloo workers == 1 worker with it all; gradient caching changes nothing."""
    from ray_e5.train.step import prepare

    row = _graded_batch(8)
    texts = prepare(row, 0, 1, "{text}")
    assert texts.scores is not None and texts.scores.tolist() == row["score"] and texts.negatives == []
    assert texts.false_negatives is None  # no in-batch negatives to mask
    variants = [(None, False), (3, True)]
    one = step_gradients(0, 1, str(tiny_decoder_dir), row, {"engine": "torch"}, variants, _loss())
    two = spawn(step_gradients, 2, str(tiny_decoder_dir), row, {"engine": "torch"}, variants, _loss())
    assert max(float(g.abs().max()) for g in one["runs"][0]["grads"].values()) > 0.01
    _assert_same(one["runs"][1], one["runs"][0])
    for k in range(len(variants)):
        for rank in range(2):
            _assert_same(two[rank]["runs"][k], one["runs"][0])


def test_score_distillation_matches_kl_of_the_softmaxes_and_leaves_masked_documents_out():
    """ScoreDistillation adds weight x KL(teacher || student) over each query's documents: zero when the student
    scores as the teacher does, positive when it ranks them otherwise, finite with masked documents, and its
    gradient reaches the student's embeddings only. The teacher may be of another width."""
    q, p, n = _unit(4, dim=16, seed=1), _unit(4, dim=16, seed=2), _unit(4, dim=16, seed=3)
    valid = torch.tensor([True, False, True, True])
    fn = torch.zeros(4, 8, dtype=torch.bool)
    fn[2, 0] = True
    base = InfoNCE(temperature=0.05)
    loss = ScoreDistillation(base, weight=0.5, temperature=0.05, teacher_temperature=0.05)
    same = LossInputs(q, p, n, valid, fn, teacher=(q, p, n))
    assert float(loss(same)) == pytest.approx(float(base(same)), abs=1e-5)

    tq, tp, tn = _unit(4, dim=6, seed=4), _unit(4, dim=6, seed=5), _unit(4, dim=6, seed=6)
    student = [x.clone().requires_grad_() for x in (q, p, n)]
    value = loss(LossInputs(*student, valid, fn, teacher=(tq, tp, tn)))
    keep = [[not fn[i, j] and (j < 4 or bool(valid[j - 4])) for j in range(8)] for i in range(4)]
    kl = 0.0
    for i in range(4):
        t = torch.cat([tp, tn]) @ tq[i] / 0.05
        s_ = torch.cat([p, n]) @ q[i] / 0.05
        kept = torch.tensor(keep[i])
        pt, ls = torch.softmax(t[kept], 0), torch.log_softmax(s_[kept], 0)
        kl += float((pt * (pt.log() - ls)).sum())
    assert float(value) == pytest.approx(float(base(LossInputs(q, p, n, valid, fn))) + 0.5 * kl / 4, rel=1e-5)
    assert kl > 0.01
    value.backward()
    assert all(x.grad is not None and torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0 for x in student)


def test_build_loss_distils_when_train_distill_is_set():
    loss = _loss(distill={"teacher": "minilm-l6", "weight": 2.0, "temperature": 0.1})
    assert isinstance(loss, ScoreDistillation) and loss.weight == 2.0 and loss.teacher_temperature == 0.1
    assert loss.temperature == 0.05 and loss.cross_device
    assert not isinstance(_loss(), ScoreDistillation)
    with pytest.raises(ValueError, match="weight"):
        _loss(distill={"weight": 0})
