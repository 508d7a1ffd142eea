"""The evaluation report: report.json, a markdown table by MTEB category beside the baselines, a bar chart."""

from __future__ import annotations

import io
import math
from typing import Any

from ray_e5 import runs

CATEGORIES = ("Classification", "Clustering", "PairClassification", "Reranking", "Retrieval", "STS",
              "Summarization", "BitextMining")
_CATEGORY_OF = {"MultilabelClassification": "Classification", "InstructionRetrieval": "Retrieval",
                "InstructionReranking": "Reranking"}


def category(task_type: str) -> str:
    return _CATEGORY_OF.get(task_type, task_type if task_type in CATEGORIES else "Other")


def _mean(values: list[float]) -> float | None:
    values = [v for v in values if v is not None]
    return sum(values) / len(values) if values else None


def build_report(models: list[dict[str, Any]], tasks: list[dict[str, Any]],
                 records: dict[str, dict[str, dict[str, Any]]]) -> dict[str, Any]:
    """``records[model_label][task_name]`` -> the report dict (scores are main scores x 100)."""
    labels = [m["label"] for m in models]
    scores = {lab: {t["name"]: (round(100 * r["score"], 4) if (r := records.get(lab, {}).get(t["name"]))
                                and r.get("status") == "ok" else None) for t in tasks} for lab in labels}
    cats = [c for c in CATEGORIES + ("Other",) if any(category(t["type"]) == c for t in tasks)]
    by_cat = {lab: {c: _mean([scores[lab][t["name"]] for t in tasks if category(t["type"]) == c]) for c in cats}
              for lab in labels}
    average = {lab: _mean(list(scores[lab].values())) for lab in labels}
    complete = {lab: all(v is not None for v in scores[lab].values()) for lab in labels}
    errors = [{"model": lab, "task": name, "error": r.get("error")}
              for lab in labels for name, r in records.get(lab, {}).items() if r.get("status") != "ok"]
    instructions = {}
    for t in tasks:
        for lab in labels:
            used = (records.get(lab, {}).get(t["name"]) or {}).get("instructions") or {}
            if any(used.values()):
                instructions[t["name"]] = used
                break
    return {"models": models, "tasks": [{**t, "category": category(t["type"])} for t in tasks],
            "scores": scores, "categories": by_cat, "average": average, "complete": complete,
            "errors": errors, "instructions": instructions,
            "seconds": {lab: {name: r.get("seconds") for name, r in records.get(lab, {}).items()} for lab in labels}}


def _fmt(value: float | None) -> str:
    return "–" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.2f}"


def markdown(report: dict[str, Any]) -> str:
    labels = [m["label"] for m in report["models"]]
    lines = ["# MTEB evaluation", "",
             "Main score of each task x 100 (mteb's evaluators). Models: "
             + ", ".join(f"**{m['label']}** (`{m['ref']}`)" for m in report["models"]) + ".", "",
             "## By category", "",
             "| Model | Average | " + " | ".join(CATEGORIES) + " |",
             "|---|---:|" + "---:|" * len(CATEGORIES)]
    for lab in labels:
        avg = _fmt(report["average"][lab]) + ("" if report["complete"][lab] else "*")
        lines.append(f"| {lab} | {avg} | "
                     + " | ".join(_fmt(report["categories"][lab].get(c)) for c in CATEGORIES) + " |")
    if not all(report["complete"].values()):
        lines += ["", "\\* some tasks failed for this model; its averages cover the tasks that finished."]
    lines += ["", "## By task", "", "| Category | Task | Metric | " + " | ".join(labels) + " |",
              "|---|---|---|" + "---:|" * len(labels)]
    tasks = sorted(report["tasks"], key=lambda t: (CATEGORIES + ("Other",)).index(t["category"]))
    for t in tasks:
        row = [report["scores"][lab][t["name"]] for lab in labels]
        best = max((v for v in row if v is not None), default=None)
        cells = [f"**{_fmt(v)}**" if v is not None and v == best and len(labels) > 1 else _fmt(v) for v in row]
        lines.append(f"| {t['category']} | {t['name']} | {t['main_score']} | " + " | ".join(cells) + " |")
    if report["instructions"]:
        lines += ["", "## Instructions used", "", "| Task | Input | Instruction |", "|---|---|---|"]
        for name, used in report["instructions"].items():
            for kind, text in used.items():
                lines.append(f"| {name} | {kind} | {text or '(none)'} |")
    if report["errors"]:
        lines += ["", "## Failed", "", "| Model | Task | Error |", "|---|---|---|"]
        for e in report["errors"]:
            lines.append(f"| {e['model']} | {e['task']} | {str(e['error']).splitlines()[0][:300]} |")
    return "\n".join(lines) + "\n"


def bar_chart(report: dict[str, Any]) -> bytes:
    """PNG: per-task main scores (left) and category averages (right), one bar per model."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    labels = [m["label"] for m in report["models"]]
    tasks = [t["name"] for t in report["tasks"]]
    cats = [c for c in CATEGORIES if any(report["categories"][lab].get(c) is not None for lab in labels)]
    groups = [(tasks, lambda lab, name: report["scores"][lab][name], "Main score by task"),
              (cats + ["Average"], lambda lab, c: report["average"][lab] if c == "Average"
               else report["categories"][lab].get(c), "Average by category")]
    fig, axes = plt.subplots(1, 2, figsize=(max(8, 1.2 * (len(tasks) + len(cats)) + 4), 4.5),
                             gridspec_kw={"width_ratios": [max(1, len(tasks)), max(1, len(cats) + 1)]})
    width = 0.8 / max(1, len(labels))
    for ax, (names, value, title) in zip(axes, groups):
        x = np.arange(len(names))
        for i, lab in enumerate(labels):
            values = [value(lab, n) for n in names]
            bars = ax.bar(x + (i - (len(labels) - 1) / 2) * width, [v or 0.0 for v in values], width, label=lab)
            ax.bar_label(bars, labels=["n/a" if v is None else f"{v:.1f}" for v in values], fontsize=7, padding=1)
        ax.set_xticks(x, names, rotation=20, ha="right", fontsize=8)
        ax.set_ylim(0, 105)
        ax.set_title(title)
        ax.set_ylabel("score x 100")
    axes[0].legend(fontsize=8, loc="lower left")
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=120)
    plt.close(fig)
    return buf.getvalue()


def write_report(out_dir: str, report: dict[str, Any]) -> dict[str, str]:
    """Write report.json, report.md and scores.png under ``out_dir``; returns their paths."""
    paths = {"json": runs.join(out_dir, "report.json"), "markdown": runs.join(out_dir, "report.md"),
             "png": runs.join(out_dir, "scores.png")}
    runs.write_json(paths["json"], report)
    runs.write_text(paths["markdown"], markdown(report))
    fs, path = runs.resolve(paths["png"])
    fs.create_dir(path.rsplit("/", 1)[0], recursive=True)
    with fs.open_output_stream(path) as out:
        out.write(bar_chart(report))
    return paths
