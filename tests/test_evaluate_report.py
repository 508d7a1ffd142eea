"""The report's English average: the bar beside English-only baselines when the suite also holds other languages."""

from __future__ import annotations

import pytest

from ray_e5.evaluate.report import build_report, markdown


def _ok(score: float) -> dict:
    return {"status": "ok", "score": score}


def test_english_average_leaves_out_the_multilingual_tasks():
    tasks = [{"name": "sts-en", "type": "STS", "main_score": "cosine_spearman", "local": True, "english": True},
             {"name": "clf-en", "type": "Classification", "main_score": "accuracy", "local": True, "english": True},
             {"name": "sts-multi", "type": "STS", "main_score": "cosine_spearman", "local": True, "english": False}]
    records = {"a": {"sts-en": _ok(0.8), "clf-en": _ok(0.6), "sts-multi": _ok(0.2)},
               "b": {"sts-en": _ok(0.7), "clf-en": _ok(0.7), "sts-multi": _ok(0.9)}}
    report = build_report([{"label": "a", "ref": "a"}, {"label": "b", "ref": "b"}], tasks, records)
    assert report["english_average"] == {"a": pytest.approx(70.0), "b": pytest.approx(70.0)}
    assert report["average"]["a"] == pytest.approx(160 / 3) and report["average"]["b"] == pytest.approx(230 / 3)
    assert report["english_tasks"] == ["sts-en", "clf-en"]
    text = markdown(report)
    assert "| Model | Average | English average |" in text and "| a | 53.33 | 70.00 |" in text


def test_an_all_english_suite_has_one_average():
    tasks = [{"name": "sts-en", "type": "STS", "main_score": "cosine_spearman", "local": True, "english": True},
             {"name": "STS12", "type": "STS", "main_score": "cosine_spearman", "local": False, "english": None}]
    report = build_report([{"label": "a", "ref": "a"}], tasks, {"a": {"sts-en": _ok(0.5)}})  # a hub task: unknown
    assert report["english_average"] == {} and "English average" not in markdown(report)
