"""The offline quickstart: every stage of the recipe on one CPU machine, inside a time budget.

Gemma 3 270M writes synthetic examples through a local llama.cpp server, a Gemma 3 270M LoRA embedder is trained
on them (plus the labeled sets the recipe names: read from the mirror under ``data_dir``, ``../shared/data`` by
default, when present, else from the Hugging Face Hub), the base and trained models are scored, and the trained
model is served behind the OpenAI-compatible API. A dataset that neither the mirror nor the Hub can serve stops
the run before anything starts, naming it. A rerun into the same run directory resumes: finished stages are
skipped, generation continues, evaluation reuses its per-task cache.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ray_e5 import storage
from ray_e5.config import BudgetShares, RayE5Config, apply_overrides, check_config, read_yaml, validate
from ray_e5.recipes import recipe_path
from ray_e5.stages import STAGES

if TYPE_CHECKING:  # the stages' typed results, named for the annotations only
    from ray_e5.generate.result import GenerateResult
    from ray_e5.train.result import TrainResult


#: budgets of at least this many minutes run the one-hour recipe (the best found for a 2-core CPU hour)
LONG_BUDGET_MIN = 60.0


def recipe_for_budget(minutes: float) -> Path:
    """The packaged recipe a budget runs when no --config is given: ``cpu-1h`` from an hour up, else
    ``quickstart``."""
    return recipe_path("cpu-1h" if minutes >= LONG_BUDGET_MIN else "quickstart")


@dataclass(frozen=True)
class Budget:
    """The time budget and how it is shared out between the stages (the recipe's ``budget:`` shares)."""

    total_s: float
    shares: BudgetShares = field(default_factory=BudgetShares)  # the packaged Gemma writes about 15 valid rows a minute on 2 cores

    def seconds(self, stage: str) -> int:
        return max(30, int(self.total_s * getattr(self.shares, stage)))


def quickstart_config(config_path: str | None, run_dir: str | None, data_dir: str | None, budget: Budget,
                      smoke: bool, overrides: list[str], log=print) -> RayE5Config:
    """The quickstart recipe (a packaged name or a file) with the budget applied and the user's overrides last;
    validated whole (every section, every error at once) before anything runs. Its datasets are checked by
    :func:`ray_e5.pipeline.run.run_pipeline` before Ray starts."""
    recipe = recipe_path(config_path) if config_path else recipe_for_budget(budget.total_s / 60)
    log(f"[ray-e5] recipe {recipe} with a budget of {budget.total_s / 60:g} min")
    data: dict[str, Any] = read_yaml(recipe)
    if "budget" in data:  # the recipe's own shares (checked again with the whole config below)
        budget = Budget(budget.total_s, validate(BudgetShares, data["budget"] or {}, prefix="budget."))
    if run_dir:
        data["run_dir"] = run_dir
    if data_dir:
        data["data_dir"] = data_dir
    train = data.setdefault("train", {})
    train["max_time_s"] = min(train.get("max_time_s") or 1e9, budget.seconds("train"))
    evaluate = data.setdefault("evaluate", {})
    generate = data.setdefault("generate", {})
    generate["time_budget_s"] = min(generate.get("time_budget_s") or 1e9, budget.seconds("generate"))
    if smoke:  # the reduced size CI runs: two examples, a few steps, the trained and base model on a small STS set
        apply_overrides(data, ["generate.num_examples=16", "generate.mix={sts: 3, short-short: 1}",
                               "generate.time_budget_s=150", "train.max_steps=20",
                               "train.batch_size=8", "train.checkpoint_every=10", "model.max_length=64"])
        evaluate["models"] = [m for m in evaluate.get("models", [])
                             if not str(m.get("model", m.get("ref", ""))).startswith("minilm")]  # `ref`: the old key
        for m in evaluate["models"]:
            if "max_length" in m:
                m["max_length"] = 64
        sts = [t for t in evaluate["tasks"] if isinstance(t, dict) and "sts" in str(t.get("path", ""))]
        evaluate["tasks"] = [{**t, "max_samples": 200} for t in sts[:1]]
    apply_overrides(data, overrides)
    return check_config(data, RayE5Config)


def _openai_example(base_url: str, model: str, key_env: str | None, key) -> tuple[str, str]:
    """An openai-client snippet and what it printed when we ran it against the live server (with the server's key
    when it has one; the snippet names where the key is, never the key)."""
    import os

    from openai import OpenAI

    client = OpenAI(base_url=base_url, api_key=key.get_secret_value() if key is not None else "unused")
    response = client.embeddings.create(model=model, input=["how do rockets reach orbit", "Rockets burn fuel."])
    vectors = [d.embedding for d in response.data]
    cosine = sum(a * b for a, b in zip(*vectors))
    if key is None:
        imports, api_key = "", '"unused"'
    elif key_env and os.environ.get(key_env) == key.get_secret_value():
        imports, api_key = "import os\n", f'os.environ["{key_env}"]'
    else:
        imports, api_key = "", '"<serve.api_key>"'
    snippet = (
        f"{imports}from openai import OpenAI\n"
        f"client = OpenAI(base_url=\"{base_url}\", api_key={api_key})\n"
        f"r = client.embeddings.create(model=\"{model}\", input=[\"how do rockets reach orbit\", \"Rockets burn fuel.\"])\n"
        "print(len(r.data[0].embedding), sum(a * b for a, b in zip(r.data[0].embedding, r.data[1].embedding)))"
    )
    return snippet, f"{len(vectors[0])} {cosine:.4f}"


def _counts(by_kind: dict[str, int]) -> str:
    return ", ".join(f"{kind} {n}" for kind, n in sorted(by_kind.items()) if n) or "none"


def synthetic_summary(generated: GenerateResult | None, trained: TrainResult | None) -> str:
    """How many synthetic rows generation wrote and training planned, per kind, and about how many of those the
    steps that ran trained on (a time-limited run ends before its plan: the plan is shuffled, so the share of
    steps that ran is the share of each source trained).

    Generated: the manifest's ``examples`` and ``by_kind``; planned: ``train/data.json``'s ``sources["synthetic"]``
    (``used_by_kind`` when the plan records it, else the total ``used``) and its ``steps``."""
    parts = []
    if generated is not None:
        parts.append(f"{generated.rows} generated ({_counts(generated.by_kind)})")
    if trained is not None:
        stats = (trained.data.get("sources") or {}).get("synthetic")
        if not stats:
            parts.append("none planned for training")
        else:
            by_kind = stats.get("used_by_kind") or {}
            planned = stats.get("used", sum(by_kind.values()))
            text = f"{planned} planned for training" + (f" ({_counts(by_kind)})" if by_kind else "")
            total = trained.data.get("steps")
            if total and trained.steps < total:
                text += f", about {round(planned * trained.steps / total)} trained ({trained.steps} of {total} steps ran)"
            parts.append(text)
    return "[ray-e5] synthetic rows: " + "; ".join(parts)


def run_quickstart(config: RayE5Config, keep_serving: bool = False, log=print,
                   allow_empty_synthetic: bool = False) -> dict[str, Any]:
    """Every stage on ``config``, then the summary: outputs, synthetic rows generated and used, the report, and
    an openai-client example run against the live server. Returns the stages' typed results by name (and
    ``openai_output``, what that example printed)."""
    from ray_e5.cluster import wait_forever
    from ray_e5.pipeline.run import run_pipeline

    start = time.perf_counter()
    results = run_pipeline(config, log=log, allow_empty_synthetic=allow_empty_synthetic)
    served = results["serve"]
    serving = config.serve
    snippet, output = _openai_example(served.url, served.model_name, serving.api_key_env, serving.resolve_api_key())
    run_dir = config.run_dir
    log("")
    log(f"[ray-e5] quickstart finished in {time.perf_counter() - start:.0f} s; outputs under {run_dir}:")
    for stage in STAGES.values():
        for out in stage.outputs:
            if out.path is not None:
                log(f"  {storage.join(run_dir, out.path):40s} {out.what}")
    log(synthetic_summary(results.get("generate"), results.get("train")))
    report = results.get("evaluate")
    if report is not None and report.report_paths.get("markdown"):
        log("")
        log(storage.read_text(report.report_paths["markdown"]))
    log("")
    log(f"[ray-e5] the embedder is served at {served.url}; with the openai client:")
    log(snippet)
    log(f"# printed: {output}")
    results["openai_output"] = output
    if keep_serving:
        wait_forever(log)
    return results
