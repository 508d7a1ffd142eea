"""The model card (README.md) of a trained embedder: what the Hub reads, what a user needs to load it the way it
was scored.

Built with ``huggingface_hub``'s ``ModelCard`` / ``ModelCardData`` / ``EvalResult`` so the front matter is what the
Hub parses (``model-index`` from the run's ``eval/report.json``), not YAML written by hand. The body says how the
model was trained (``train/summary.json``, ``train/data.json``, ``synthetic/manifest.json``) and how to load it with
the inference settings it was scored with (the embedder's ``inference`` block, see
:func:`ray_e5.model.embedder.read_inference`): a user who loads it at another length or dtype gets other vectors.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from ray_e5 import storage
from ray_e5.rundir import EMBEDDER_DIR, RunDir

#: packaged names -> the Hub model they are a copy of (the Hub's ``base_model`` must be a Hub id)
HUB_IDS = {"gemma3-270m": "google/gemma-3-270m", "minilm-l6": "sentence-transformers/all-MiniLM-L6-v2"}
CARD_FILE = "README.md"


def hub_base_model(reference: str) -> str:
    """The Hub id of a base model reference: a packaged name's source model, an HF id as it is, else the last part
    of a local path (the Hub cannot link it; the body names the path)."""
    if reference in HUB_IDS:
        return HUB_IDS[reference]
    if "/" in reference and not reference.startswith((".", "/", "~")) and "://" not in reference \
            and reference.count("/") == 1:
        return reference
    return Path(reference.rstrip("/")).name or reference


def run_dir_of(embedder_ref: str) -> str | None:
    """The run directory an embedder directory belongs to (``<run_dir>/embedder``), when it looks like one."""
    ref = str(embedder_ref).rstrip("/")
    if ref.rsplit("/", 1)[-1] != EMBEDDER_DIR:
        return None
    parent = ref.rsplit("/", 1)[0] if "/" in ref else "."
    run = RunDir.of(parent)
    if any(storage.exists(p) for p in (run.train_summary, run.join("eval", "report.json"), run.manifest)):
        return run.uri
    return None


def _read(uri: str) -> Any:
    try:
        return storage.read_json(uri) if storage.exists(uri) else None
    except (OSError, ValueError):
        return None


def run_records(run_dir: str | None) -> dict[str, Any]:
    """What a card says about a run: eval report, training summary and plan, generation manifest (absent: None)."""
    if not run_dir:
        return {}
    run = RunDir.of(run_dir)
    return {"report": _read(run.join("eval", "report.json")), "summary": _read(run.train_summary),
            "data": _read(run.train_data), "manifest": _read(run.manifest), "run_dir": run.uri}


def _same_model(ref: str | None, embedder_ref: str | None) -> bool:
    if not ref or not embedder_ref:
        return False
    a, b = str(ref).rstrip("/"), str(embedder_ref).rstrip("/")
    if storage.is_local(a) and storage.is_local(b):
        return Path(a).expanduser().resolve() == Path(b).expanduser().resolve()
    return a == b


def scored_label(report: dict, embedder_ref: str | None) -> str | None:
    """The report's label for this embedder: the model whose reference is it, else the one labelled ``trained``,
    else the one model whose reference is a run's ``embedder/``."""
    models = report.get("models") or []
    for m in models:
        if not m.get("parent") and _same_model(m.get("ref") or m.get("model"), embedder_ref):
            return m["label"]
    labels = [m["label"] for m in models if not m.get("parent")]
    if "trained" in labels:
        return "trained"
    own = [m["label"] for m in models if not m.get("parent")
           and str(m.get("ref") or m.get("model") or "").rstrip("/").endswith(f"/{EMBEDDER_DIR}")]
    return own[0] if len(own) == 1 else None


def eval_results(report: dict, label: str):
    """One ``EvalResult`` per task this model was scored on (the report's scores are main scores x 100)."""
    from huggingface_hub import EvalResult

    scores = (report.get("scores") or {}).get(label) or {}
    out = []
    for task in report.get("tasks") or []:
        value = scores.get(task["name"])
        if value is None:
            continue
        metric = task.get("main_score") or "main_score"
        out.append(EvalResult(task_type=task.get("category") or task.get("type") or "Other",
                              dataset_type=task.get("hf") or task["name"], dataset_name=task["name"],
                              metric_type=metric, metric_value=round(float(value), 4),
                              metric_name=f"{metric} (x100)"))
    return out


def _scores_table(report: dict, label: str) -> list[str]:
    tasks = [t for t in report.get("tasks") or []]
    labels = [m["label"] for m in report.get("models") or [] if not m.get("parent")]
    if not tasks or label not in labels:
        return []
    labels = [label] + [lab for lab in labels if lab != label]
    scores = report.get("scores") or {}

    def cell(lab, name):
        v = (scores.get(lab) or {}).get(name)
        return "-" if v is None else f"{v:.2f}"

    lines = ["| task | metric | " + " | ".join(f"**{lab}**" if lab == label else lab for lab in labels) + " |",
             "|---|---|" + "---|" * len(labels)]
    for t in tasks:
        lines.append(f"| {t['name']} | {t.get('main_score') or ''} | "
                     + " | ".join(cell(lab, t["name"]) for lab in labels) + " |")
    average = report.get("average") or {}
    if any(average.get(lab) is not None for lab in labels):
        lines.append("| **average** | | " + " | ".join(
            "-" if average.get(lab) is None else f"{average[lab]:.2f}" for lab in labels) + " |")
    return lines


def _training_lines(records: dict) -> list[str]:
    summary, data, manifest = records.get("summary"), records.get("data"), records.get("manifest")
    lines = []
    if summary:
        lines.append(f"- steps: {summary.get('steps')} of {summary.get('planned_steps')} planned"
                     + (" (stopped early)" if summary.get("stopped_early") else "")
                     + (f", {summary['seconds']} s" if summary.get("seconds") is not None else ""))
    if data:
        lines.append(f"- batch size: {data.get('batch_size')}, {data.get('steps')} batches in the plan")
        sources = data.get("sources") or {}
        total = sum(int(s.get("used") or 0) for s in sources.values())
        synthetic = sum(int(s.get("used") or 0) for name, s in sources.items() if "synthetic" in name)
        if sources:
            lines.append("")
            lines.append("| source | rows | valid | used | kinds |")
            lines.append("|---|---|---|---|---|")
            for name, s in sources.items():
                lines.append(f"| {name} | {s.get('rows')} | {s.get('valid')} | {s.get('used')} | "
                             f"{', '.join(s.get('kinds') or [])} |")
            lines.append("")
            share = f"{100 * synthetic / total:.1f}%" if total else "n/a"
            lines.append(f"- synthetic share of the rows used: {share} ({synthetic} of {total})")
    if manifest:
        lines.append(f"- synthetic data: {manifest.get('examples')} examples written by `{manifest.get('model')}` "
                     f"({manifest.get('backend')}); by kind: {json.dumps(manifest.get('by_kind') or {})}")
    return lines


def _datasets(records: dict, extra: list[str] | None) -> list[str]:
    """Hub dataset ids among the training sources (a name of the form org/name), plus ``extra``."""
    names = list(extra or [])
    for name in ((records.get("data") or {}).get("sources") or {}):
        if "/" in name and not name.startswith((".", "/")) and name.count("/") == 1 and name not in names:
            names.append(name)
    return names


def build_model_card(embedder, embedder_ref: str | None = None, records: dict | None = None,
                     model_id: str | None = None, datasets: list[str] | None = None,
                     training: dict | None = None):
    """The ``ModelCard`` of ``embedder`` (an Embedder). ``records``: :func:`run_records` of its run (eval report,
    training summary and plan, manifest); ``model_id``: what the usage snippets load (the Hub repo, else the
    folder); ``training``: the train settings (recipe) to show."""
    from huggingface_hub import ModelCard, ModelCardData

    records = records or {}
    settings = embedder.settings
    inference = dict(getattr(embedder, "inference", None) or {})
    report = records.get("report")
    label = scored_label(report, embedder_ref) if report else None
    results = eval_results(report, label) if report and label else []
    name = model_id.rsplit("/", 1)[-1] if model_id else "ray-e5-embedder"
    base = hub_base_model(embedder.base_reference)
    data = ModelCardData(
        library_name="sentence-transformers", base_model=base, pipeline_tag="sentence-similarity",
        tags=["sentence-transformers", "sentence-similarity", "feature-extraction", "text-embeddings-inference",
              "ray-e5", "e5", "lora"],
        datasets=_datasets(records, datasets) or None, model_name=name, eval_results=results or None)
    max_length = settings.max_length
    dtype = inference.get("dtype") or settings.dtype
    template = settings.instruction_template
    instructions = inference.get("instructions")
    ref = model_id or "path/to/this/folder"
    example_task = "Given a web search query, retrieve relevant passages that answer the query"
    query_note = ("this model was scored **without** instructions: embed queries and documents as they are"
                  if instructions is False else
                  f"queries get the instruction template `{json.dumps(template)[1:-1]}`; documents go as they are")
    lines = [
        f"# {name}", "",
        f"A text embedder fine-tuned with [ray-e5](https://github.com/) (E5-mistral recipe: LoRA, InfoNCE, "
        f"{settings.pooling}-token pooling) from `{embedder.base_reference}`.", "",
        "## Inference settings (as scored)", "",
        f"- max length: {max_length} tokens" + (f" (scored at; trained at {inference['trained_max_length']})"
                                                 if inference.get("trained_max_length") not in (None, max_length)
                                                 else ""),
        f"- dtype: {dtype}" + (" (bf16 where the hardware runs it natively, else fp32)" if dtype == "auto" else ""),
        f"- pooling: {settings.pooling}" + (" (EOS appended; the exported tokenizer adds it)"
                                            if settings.pooling == "last" else ""),
        f"- normalised: {settings.normalize}; dimension: {embedder.dimension}",
        f"- instruction template: `{json.dumps(template)[1:-1]}`; {query_note}",
        "" if not inference.get("source") else f"- recorded from: {inference['source']}", "",
    ]
    if report and label:
        lines += ["## Evaluation", "", f"Scores x 100 from `ray-e5 evaluate` (this model is `{label}`):", "",
                  *_scores_table(report, label), ""]
    training_lines = _training_lines(records)
    if training_lines or training:
        lines += ["## Training", "", *training_lines, ""]
        if training:
            lines += ["Training settings (`train:`):", "", "```json", json.dumps(training, indent=2, default=str),
                      "```", ""]
    query = ("\"how do rockets work\"" if instructions is False else
             f"\"{json.dumps(template)[1:-1]}\".format(task=\"{example_task}\", text=\"how do rockets work\")")
    lines += [
        "## Use", "", "### sentence-transformers", "", "```python",
        "from sentence_transformers import SentenceTransformer", "",
        f"model = SentenceTransformer(\"{ref}\")", f"model.max_seq_length = {max_length}",
        f"queries = model.encode([{query}])",
        "documents = model.encode([\"Rockets burn fuel and push exhaust backwards.\"])",
        "print(model.similarity(queries, documents))", "```", "",
        "### ray-e5 serve and the openai client", "",
        f"`ray-e5 serve --set serve.model={ref}` serves it at {max_length} tokens in {dtype} (override with "
        "`serve.max_tokens_per_input`, `serve.dtype`) behind an OpenAI-compatible `/v1/embeddings`:", "",
        "```python", "from openai import OpenAI", "",
        "client = OpenAI(base_url=\"http://127.0.0.1:8000/v1\", api_key=\"unused\")",
        "vectors = client.embeddings.create(model=\"ray-e5\", input=[\"how do rockets work\"]"
        + ("" if instructions is False else f", extra_body={{\"instruction\": \"{example_task}\"}}") + ")",
        "```", "",
        "### vLLM", "", "```python", "from vllm import LLM", "",
        f"llm = LLM(model=\"{ref}\", runner=\"pooling\", max_model_len={max_length}"
        + (f", dtype=\"{'bfloat16' if dtype == 'bf16' else 'float16' if dtype == 'fp16' else 'float32'}\""
           if dtype in ("bf16", "fp16", "fp32") else "") + ")",
        f"outputs = llm.embed([{query}])", "```", "",
    ]
    body = "\n".join(lines)
    return ModelCard(f"---\n{data.to_yaml()}\n---\n\n{body}")


def write_model_card(folder: str | Path, embedder, embedder_ref: str | None = None, run_dir: str | None = None,
                     model_id: str | None = None, training: dict | None = None) -> Path:
    """Write ``folder/README.md`` (see :func:`build_model_card`); ``run_dir`` defaults to the embedder's own run
    directory when ``embedder_ref`` is ``<run_dir>/embedder``."""
    if run_dir is None and embedder_ref:
        run_dir = run_dir_of(embedder_ref)
    card = build_model_card(embedder, embedder_ref, run_records(run_dir), model_id=model_id, training=training)
    path = Path(folder) / CARD_FILE
    card.save(path)
    return path
