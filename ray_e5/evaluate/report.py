"""The evaluation report: report.json, a markdown table by MTEB category beside the baselines, a bar chart."""

from __future__ import annotations

import io
import math
from typing import Any

from ray_e5 import storage

CATEGORIES = ("Classification", "Clustering", "PairClassification", "Reranking", "Retrieval", "STS",
              "Summarization", "BitextMining")
_CATEGORY_OF = {"MultilabelClassification": "Classification", "InstructionRetrieval": "Retrieval",
                "InstructionReranking": "Reranking"}


#: built-in diagnostics, reported in their own sections and left out of the MTEB averages
DIAGNOSTICS = ("Passkey",)
ORDER = CATEGORIES + ("Other",) + DIAGNOSTICS


def category(task_type: str) -> str:
    if task_type in DIAGNOSTICS:
        return task_type
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
    mteb_tasks = [t["name"] for t in tasks if category(t["type"]) not in DIAGNOSTICS]
    average = {lab: _mean([scores[lab][name] for name in mteb_tasks]) for lab in labels}
    # Beside English-only baselines (MiniLM) the fair bar is the English tasks' average; reported when the suite
    # also holds tasks known to be in other languages.
    english = [t["name"] for t in tasks if t.get("english") and category(t["type"]) not in DIAGNOSTICS]
    other = [t for t in tasks if t.get("english") is False and category(t["type"]) not in DIAGNOSTICS]
    english_average = ({lab: _mean([scores[lab][name] for name in english]) for lab in labels}
                       if english and other else {})
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
    report = {"models": models, "tasks": [{**t, "category": category(t["type"])} for t in tasks],
              "scores": scores, "categories": by_cat, "average": average, "english_average": english_average,
              "english_tasks": english if english_average else [], "complete": complete,
              "errors": errors, "instructions": instructions,
              "seconds": {lab: {name: r.get("seconds") for name, r in records.get(lab, {}).items()}
                          for lab in labels}}
    report["passkey"] = passkey_tables(labels, tasks, records)
    report["languages"] = language_tables(labels, tasks, records)
    report["widths"] = width_table(models, tasks, scores)
    return report


def _ok(records, lab, name) -> dict | None:
    record = records.get(lab, {}).get(name)
    return record if record and record.get("status") == "ok" else None


def passkey_tables(labels, tasks, records) -> dict[str, Any]:
    """Per passkey task: accuracy (0-1) by length and model, with chance, truncation and speed."""
    out = {}
    for t in tasks:
        if t["type"] != "Passkey":
            continue
        table: dict[str, Any] = {"lengths": [], "chance": None, "accuracy": {}, "truncated": {}, "max_length": {},
                                 "texts_per_s": {}, "seconds": {}}
        for lab in labels:
            record = _ok(records, lab, t["name"])
            if not record or "passkey" not in record:
                continue
            pk = record["passkey"]
            table["lengths"] = sorted(set(table["lengths"]) | {int(n) for n in pk["lengths"]})
            table["chance"] = pk.get("chance")
            for key in ("accuracy", "truncated", "texts_per_s", "seconds"):
                table[key][lab] = pk.get(key, {})
            table["max_length"][lab] = pk.get("max_length")
        out[t["name"]] = table
    return out


def _subset_scores(record: dict) -> dict[str, tuple[list[str], float]]:
    """hf_subset -> (languages, main score x 100), averaged over the evaluated splits."""
    collected: dict[str, list] = {}
    for split_scores in ((record.get("result") or {}).get("scores") or {}).values():
        for entry in split_scores:
            if entry.get("main_score") is None:
                continue
            langs, values = collected.setdefault(entry.get("hf_subset", "default"), [entry.get("languages"), []])
            values.append(float(entry["main_score"]))
    return {subset: (langs or [], round(100 * sum(v) / len(v), 4)) for subset, (langs, v) in collected.items()}


def language_tables(labels, tasks, records) -> dict[str, Any]:
    """Per task with more than one subset (Tatoeba's language pairs, STS-B multilingual's languages): the main
    score x 100 of each subset and model."""
    out = {}
    for t in tasks:
        by_model = {lab: _subset_scores(r) for lab in labels if (r := _ok(records, lab, t["name"]))}
        subsets = sorted({s for scores in by_model.values() for s in scores})
        if len(subsets) < 2:
            continue
        languages = {}
        for scores in by_model.values():
            for subset, (langs, _) in scores.items():
                languages.setdefault(subset, langs)
        out[t["name"]] = {"category": category(t["type"]), "subsets": subsets, "languages": languages,
                          "scores": {lab: {s: by_model.get(lab, {}).get(s, (None, None))[1] for s in subsets}
                                     for lab in labels}}
    return out


def width_table(models, tasks, scores) -> dict[str, Any]:
    """Models scored at truncated widths (``evaluate.dimensions``): average (and per-task) score by width, one row
    per base model; the full width is the model's own label."""
    variants = [m for m in models if m.get("dimension")]
    if not variants:
        return {}
    mteb_tasks = [t["name"] for t in tasks if category(t["type"]) not in DIAGNOSTICS]
    out: dict[str, Any] = {}
    for m in models:
        if m.get("dimension"):
            continue
        rows = {"full": {"dimension": m.get("full_dimension"), "label": m["label"]}}
        for v in variants:
            if v.get("parent") == m["label"]:
                rows[str(v["dimension"])] = {"dimension": v["dimension"], "label": v["label"]}
        if len(rows) < 2:
            continue
        for row in rows.values():
            row["average"] = _mean([scores[row["label"]][name] for name in mteb_tasks])
            row["tasks"] = {name: scores[row["label"]][name] for name in mteb_tasks}
        out[m["label"]] = rows
    return out


def _fmt(value: float | None) -> str:
    return "–" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.2f}"


def markdown(report: dict[str, Any]) -> str:
    labels = [m["label"] for m in report["models"]]
    lines = ["# MTEB evaluation", "",
             "Main score of each task x 100 (mteb's evaluators). Models: "
             + ", ".join(f"**{m['label']}** (`{m['ref']}`)" for m in report["models"]) + ".", "",
             "## By category", "",
             "| Model | Average | " + ("English average | " if report.get("english_average") else "")
             + " | ".join(CATEGORIES) + " |",
             "|---|---:|" + ("---:|" if report.get("english_average") else "") + "---:|" * len(CATEGORIES)]
    for lab in labels:
        avg = _fmt(report["average"][lab]) + ("" if report["complete"][lab] else "*")
        if report.get("english_average"):
            avg += f" | {_fmt(report['english_average'][lab])}"
        lines.append(f"| {lab} | {avg} | "
                     + " | ".join(_fmt(report["categories"][lab].get(c)) for c in CATEGORIES) + " |")
    if not all(report["complete"].values()):
        lines += ["", "\\* some tasks failed for this model; its averages cover the tasks that finished."]
    lines += ["", "## By task", "", "| Category | Task | Metric | " + " | ".join(labels) + " |",
              "|---|---|---|" + "---:|" * len(labels)]
    tasks = sorted(report["tasks"], key=lambda t: ORDER.index(t["category"]))
    for t in tasks:
        row = [report["scores"][lab][t["name"]] for lab in labels]
        best = max((v for v in row if v is not None), default=None)
        cells = [f"**{_fmt(v)}**" if v is not None and v == best and len(labels) > 1 else _fmt(v) for v in row]
        lines.append(f"| {t['category']} | {t['name']} | {t['main_score']} | " + " | ".join(cells) + " |")
    lines += _language_lines(report, labels) + _width_lines(report) + _passkey_lines(report, labels)
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


def _language_lines(report, labels) -> list[str]:
    lines = []
    for name, table in (report.get("languages") or {}).items():
        lines += ["", f"## By language: {name} ({table['category']})", "",
                  "| Subset | Languages | " + " | ".join(labels) + " |", "|---|---|" + "---:|" * len(labels)]
        for subset in table["subsets"]:
            row = [table["scores"][lab].get(subset) for lab in labels]
            best = max((v for v in row if v is not None), default=None)
            cells = [f"**{_fmt(v)}**" if v is not None and v == best and len(labels) > 1 else _fmt(v) for v in row]
            lines.append(f"| {subset} | {', '.join(table['languages'].get(subset) or [])} | " + " | ".join(cells) + " |")
    return lines


def _width_lines(report) -> list[str]:
    widths = report.get("widths") or {}
    if not widths:
        return []
    dims = sorted({int(k) for rows in widths.values() for k in rows if k != "full"})
    lines = ["", "## Score against width", "",
             "Average main score x 100 over the MTEB tasks, vectors truncated to the first d dimensions and "
             "re-normalised (Matryoshka); `full` is the model's own width.", "",
             "| Model | " + " | ".join(str(d) for d in dims) + " | full |", "|---|" + "---:|" * (len(dims) + 1)]
    for label, rows in widths.items():
        cells = [_fmt(rows.get(str(d), {}).get("average")) for d in dims] + [_fmt(rows["full"]["average"])]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return lines


def _passkey_lines(report, labels) -> list[str]:
    lines = []
    for name, table in (report.get("passkey") or {}).items():
        if not table["lengths"]:
            continue
        lengths = table["lengths"]
        chance = table["chance"]
        lines += ["", f"## Passkey retrieval: {name}", "",
                  f"Top-1 accuracy by document length in tokens (chance {_fmt(chance)} with "
                  f"{round(1 / chance) if chance else '?'} candidates); `t` marks lengths above the model's "
                  "max_length (documents truncated).", "",
                  "| Model | max_length | " + " | ".join(str(n) for n in lengths) + " |",
                  "|---|---:|" + "---:|" * len(lengths)]
        for lab in labels:
            if lab not in table["accuracy"]:
                continue
            acc, cut = table["accuracy"][lab], table["truncated"].get(lab, {})
            cells = [(_fmt(acc.get(str(n))) + (" t" if cut.get(str(n)) else "")) if str(n) in acc else "–"
                     for n in lengths]
            lines.append(f"| {lab} | {table['max_length'].get(lab) or '–'} | " + " | ".join(cells) + " |")
    return lines


def _png(fig) -> bytes:
    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=120)
    plt.close(fig)
    return buf.getvalue()


def passkey_chart(report: dict[str, Any]) -> bytes | None:
    """PNG: passkey accuracy against document length (log2 axis), one line per model, chance dashed."""
    tables = [(name, t) for name, t in (report.get("passkey") or {}).items() if t["lengths"] and t["accuracy"]]
    if not tables:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(tables), figsize=(6 * len(tables), 4.2), squeeze=False)
    for ax, (name, table) in zip(axes[0], tables):
        for lab, acc in table["accuracy"].items():
            xs = [n for n in table["lengths"] if str(n) in acc]
            ax.plot(xs, [acc[str(n)] for n in xs], marker="o", label=lab)
        if table["chance"]:
            ax.axhline(table["chance"], color="grey", linestyle="--", linewidth=1, label="chance")
        ax.set_xscale("log", base=2)
        ax.set_xticks(table["lengths"], [str(n) for n in table["lengths"]])
        ax.set_ylim(-0.02, 1.05)
        ax.set_xlabel("document length (tokens)")
        ax.set_ylabel("top-1 accuracy")
        ax.set_title(f"Passkey retrieval: {name}")
        ax.legend(fontsize=8)
    fig.tight_layout()
    return _png(fig)


def width_chart(report: dict[str, Any]) -> bytes | None:
    """PNG: average score against embedding width (log2 axis), one line per model."""
    widths = report.get("widths") or {}
    if not widths:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4.2))
    for label, rows in widths.items():
        points = sorted((row["dimension"], row["average"]) for row in rows.values()
                        if row.get("dimension") and row.get("average") is not None)
        ax.plot([d for d, _ in points], [v for _, v in points], marker="o", label=label)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("embedding width (dimensions)")
    ax.set_ylabel("average score x 100")
    ax.set_title("Score against width")
    ax.legend(fontsize=8)
    fig.tight_layout()
    return _png(fig)


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
    return _png(fig)


def write_report(out_dir: str, report: dict[str, Any]) -> dict[str, str]:
    """Write report.json, report.md and scores.png under ``out_dir``; returns their paths."""
    paths = {"json": storage.join(out_dir, "report.json"), "markdown": storage.join(out_dir, "report.md"),
             "png": storage.join(out_dir, "scores.png")}
    storage.write_json(paths["json"], report)
    storage.write_text(paths["markdown"], markdown(report))
    charts = {"png": bar_chart(report)}
    if (png := passkey_chart(report)) is not None:
        paths["passkey_png"] = storage.join(out_dir, "passkey.png")
        charts["passkey_png"] = png
    if (png := width_chart(report)) is not None:
        paths["widths_png"] = storage.join(out_dir, "widths.png")
        charts["widths_png"] = png
    for key, data in charts.items():
        fs, path = storage.resolve(paths[key])
        fs.create_dir(path.rsplit("/", 1)[0], recursive=True)
        with fs.open_output_stream(path) as out:
            out.write(data)
    return paths
