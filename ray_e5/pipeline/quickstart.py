"""The offline quickstart: every stage of the recipe on one CPU machine, inside a time budget.

Gemma 3 270M writes synthetic examples through a local llama.cpp server, a Gemma 3 270M LoRA embedder is trained
on them (plus the labeled sets of ``../shared/data`` when present), the base and trained models are scored on local
tasks, and the trained model is served behind the OpenAI-compatible API. A rerun into the same run directory
resumes: finished stages are skipped, generation continues, evaluation reuses its per-task cache.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ray_e5 import runs
from ray_e5.config import RayE5Config, apply_overrides, load_config, read_yaml, validate

REPO_CONFIGS = Path(__file__).resolve().parents[2] / "configs"


@dataclass(frozen=True)
class Budget:
    """How the time budget is shared out between the stages (fractions of the whole)."""

    total_s: float
    generate: float = 0.22
    train: float = 0.45
    evaluate: float = 0.18

    def seconds(self, stage: str) -> int:
        return max(30, int(self.total_s * getattr(self, stage)))


def _existing(path: str, data_dir: str | None) -> str | None:
    """Rewrite a ``../shared/data/...`` path onto ``data_dir``; None when the file or folder is absent."""
    if data_dir and "shared/data/" in path:
        path = str(Path(data_dir) / path.split("shared/data/", 1)[1])
    return path if Path(path).exists() else None


def _keep_present(items: list, data_dir: str | None, key: str, log) -> list:
    kept = []
    for item in items:
        path = item.get(key) if isinstance(item, dict) else item
        if not isinstance(path, str) or ("/" not in path and key == "path" and isinstance(item, str) and not Path(path).exists()):
            kept.append(item)
            continue
        found = _existing(path, data_dir)
        if found is None:
            log(f"[ray-e5] skipping {path}: not found (pass --data-dir to point at the shared datasets)")
            continue
        kept.append({**item, key: found} if isinstance(item, dict) else found)
    return kept


def quickstart_config(config_path: str | None, run_dir: str | None, data_dir: str | None, budget: Budget,
                      smoke: bool, overrides: list[str], log=print) -> RayE5Config:
    """The quickstart recipe with the budget applied, absent datasets dropped, and the user's overrides last."""
    data: dict[str, Any] = read_yaml(config_path or REPO_CONFIGS / "quickstart.yaml")
    if run_dir:
        data["run_dir"] = run_dir
    train = data.setdefault("train", {})
    train["sources"] = _keep_present(train.get("sources", []), data_dir, "path", log)
    train["max_time_s"] = min(train.get("max_time_s") or 1e9, budget.seconds("train"))
    evaluate = data.setdefault("evaluate", {})
    evaluate["tasks"] = _keep_present(evaluate.get("tasks", []), data_dir, "path", log)
    generate = data.setdefault("generate", {})
    generate["time_budget_s"] = min(generate.get("time_budget_s") or 1e9, budget.seconds("generate"))
    if smoke:  # the reduced size CI runs: two examples, a few steps, the trained and base model on a small STS set
        apply_overrides(data, ["generate.num_examples=2", "generate.max_tokens=96", "train.max_steps=20",
                               "train.batch_size=8", "train.checkpoint_every=10", "model.max_length=64"])
        evaluate["models"] = [m for m in evaluate.get("models", []) if not str(m.get("ref", "")).startswith("minilm")]
        for m in evaluate["models"]:
            if "max_length" in m:
                m["max_length"] = 64
        sts = [t for t in evaluate["tasks"] if isinstance(t, dict) and "sts" in str(t.get("path", ""))]
        evaluate["tasks"] = [{**t, "max_samples": 200} for t in sts[:1]]
    apply_overrides(data, overrides)
    return validate(RayE5Config, data)


def _openai_example(base_url: str, model: str) -> tuple[str, str]:
    """An openai-client snippet and what it printed when we ran it against the live server."""
    from openai import OpenAI

    client = OpenAI(base_url=base_url, api_key="unused")
    response = client.embeddings.create(model=model, input=["how do rockets reach orbit", "Rockets burn fuel."])
    vectors = [d.embedding for d in response.data]
    cosine = sum(a * b for a, b in zip(*vectors))
    snippet = (
        "from openai import OpenAI\n"
        f"client = OpenAI(base_url=\"{base_url}\", api_key=\"unused\")\n"
        f"r = client.embeddings.create(model=\"{model}\", input=[\"how do rockets reach orbit\", \"Rockets burn fuel.\"])\n"
        "print(len(r.data[0].embedding), sum(a * b for a, b in zip(r.data[0].embedding, r.data[1].embedding)))"
    )
    return snippet, f"{len(vectors[0])} {cosine:.4f}"


def run_quickstart(config: RayE5Config, keep_serving: bool = False, log=print) -> dict[str, Any]:
    from ray_e5.pipeline.run import run_pipeline

    start = time.perf_counter()
    results = run_pipeline(config, log=log)
    base_url = results["serve"]
    served = config.section("serve", _serve_settings()).model_name if config.serve else "ray-e5"
    snippet, output = _openai_example(str(base_url), served)
    run_dir = config.run_dir
    log("")
    log(f"[ray-e5] quickstart finished in {time.perf_counter() - start:.0f} s; outputs under {run_dir}:")
    for name, what in (("synthetic", "generated examples (Parquet) + manifest.json"),
                       ("train", "metrics.jsonl, loss_curve.png, checkpoints"),
                       ("embedder", "the trained embedder (ray_e5.json + LoRA adapter)"),
                       ("eval", "report.md, report.json, scores.png, per-task results")):
        log(f"  {runs.join(run_dir, name):40s} {what}")
    report = results.get("evaluate")
    if isinstance(report, dict) and report.get("paths"):
        log("")
        log(runs.read_text(report["paths"]["markdown"]))
    log("")
    log(f"[ray-e5] the embedder is served at {base_url}; with the openai client:")
    log(snippet)
    log(f"# printed: {output}")
    results["openai_output"] = output
    if keep_serving:
        from ray_e5.pipeline.run import wait_forever

        wait_forever()
    return results


def _serve_settings():
    from ray_e5.serve.config import ServeSettings

    return ServeSettings
