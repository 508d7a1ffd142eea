"""The one-hour recipe's levers, each measured on the English dev suite: trained variants, base Gemma and MiniLM
in one ``ray-e5 evaluate`` report, with the wall time of every training run.

Each variant is ``configs/cpu-1h.yaml`` (or ``--config``) with a few keys changed, trained for ``--train-min``
minutes on the labeled train splits and the synthetic rows already in ``--synthetic-from`` (a run directory whose
``generate`` stage ran; none: labeled data only), so the variants differ in one lever each and share their data.
Then every trained embedder, the base Gemma (last-token and mean pooling) and MiniLM-L6 are scored on the recipe's
evaluate tasks in one report (``<out>/eval/report.md``), and a table of English average, per-task scores and
training wall time is printed.

    python bench/quality_train.py --out runs/levers --train-min 8 [--variants recipe,labeled-only,...]
        [--synthetic-from runs/cpu-1h] [--config configs/cpu-1h.yaml] [--skip-train] [--english-only]
        [--soup a+b,...]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")  # as the CLI: no model-loading bars in the table's log
ROOT = Path(__file__).resolve().parents[1]

#: variant -> the overrides it makes to the recipe (one lever each; "recipe" is the recipe itself)
VARIANTS: dict[str, list[str]] = {
    "recipe": [],
    "labeled-only": ["train.synthetic=false"],
    "no-classification-pairs": ["__drop_source__=banking77"],
    "batch-by-task": ["train.batch_by=task"],
    "no-false-negative-mask": ["train.mask_false_negatives=false"],
    "no-instruction": ['model.instruction_template="{text}"'],  # quoted: a bare {text} is a YAML mapping
    "last-token": ["model.pooling=last"],
    "all-layers-lora": ["model.lora.top_layers=null"],
    "grad-cache-128": ["train.gradient_cache=true", "train.batch_size=128"],
    "fixed-schedule": ["train.fit_schedule_to_time=false"],
    "first-14-layers": ["model.num_layers=14"],  # the top 4 of Gemma 270M's 18 layers cut (ray_e5/model/depth.py)
    "first-12-layers": ["model.num_layers=12"],
    "temperature-0.02": ["train.temperature=0.02"],  # the paper's
    "lr-1e-3": ["train.lr=1.0e-3"],
    "symmetric-loss": ["train.symmetric_loss=true"],  # InfoNCE both ways (GTE; MultipleNegativesSymmetricRankingLoss)
    # STS-B and SICK train pairs a second time, every pair with its gold score, under the CoSENT loss
    "cosent-sts": ['__add_source__={"path": "stsbenchmark/train.jsonl", "name": "stsb-graded", "loss": "cosent", "weight": 0.5}',
                   '__add_source__={"path": "sick/train.jsonl", "name": "sick-graded", "loss": "cosent", "weight": 0.5}'],
    # hard negatives mined with the base model for the STS pairs, which have none (ray_e5.data.mining)
    "mined-negatives": ['train.mine={"sources": ["stsb", "sick"]}'],
    # the same, mined with the recipe variant's trained embedder ("{out}": --out), as ANCE-style mining does
    "mined-by-recipe": ['train.mine={"sources": ["stsb", "sick"], "model": "{out}/recipe/embedder"}'],
    # the paper's ablation: synthetic rows as a fixed share of the examples trained on (repeated as needed), and
    # synthetic rows alone (no labeled source)
    "syn-10": ["train.synthetic=true", "train.synthetic_share=0.1"],
    "syn-30": ["train.synthetic=true", "train.synthetic_share=0.3"],
    "syn-50": ["train.synthetic=true", "train.synthetic_share=0.5"],
    # (each row repeated up to 20 times an epoch, so that the time limit, not the data, ends training, as for the rest)
    "synthetic-only": ["train.synthetic=true", "train.sources=[]", "train.synthetic_weight=20"],
    # levers from the field
    "distill": ['train.distill={"teacher": "minilm-l6", "weight": 1.0}'],  # score distillation from MiniLM
    "bidirectional": ["model.bidirectional=true"],  # Gemma 3's bidirectional attention, mean pooling kept
    # repeated texts pay only for the adapted layers: more steps in the same minutes
    "cache-frozen-layers": ["train.cache_frozen_layers=true"],
    # the paper's task instructions on queries (the recipe trains and scores without them)
    "instruction": ['model.instruction_template="Instruct: {task}\\nQuery: {text}"'],
}


def variant_config(recipe: Path, name: str, out: Path, train_min: float, synthetic_from: str | None):
    from ray_e5.config import apply_overrides, check_config, RayE5Config, read_yaml

    data = read_yaml(recipe)
    overrides = [o.replace("{out}", str(out)) for o in VARIANTS[name]]
    drop = [o.split("=", 1)[1] for o in overrides if o.startswith("__drop_source__=")]
    add = [json.loads(o.split("=", 1)[1]) for o in overrides if o.startswith("__add_source__=")]
    overrides = [o for o in overrides if not o.startswith(("__drop_source__=", "__add_source__="))]
    data["train"]["sources"] = [s for s in data["train"]["sources"] if s.get("name") not in drop] + add
    run_dir = out / name
    run_dir.mkdir(parents=True, exist_ok=True)
    if synthetic_from and (Path(synthetic_from) / "synthetic").is_dir() and not (run_dir / "synthetic").exists():
        shutil.copytree(Path(synthetic_from) / "synthetic", run_dir / "synthetic")
    apply_overrides(data, [f"run_dir={run_dir}", f"train.max_time_s={train_min * 60:g}", "train.resume=false",
                           f"data_dir={(ROOT / data.get('data_dir', '../shared/data')).resolve()}"] + overrides)
    return check_config(data, RayE5Config)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default=str(ROOT / "configs" / "cpu-1h.yaml"))
    parser.add_argument("--out", default="runs/levers")
    parser.add_argument("--variants", default="recipe,labeled-only,no-classification-pairs,last-token")
    parser.add_argument("--train-min", type=float, default=8.0, help="training wall time of each variant")
    parser.add_argument("--synthetic-from", default=None, help="a run dir whose synthetic/ every variant shares")
    parser.add_argument("--soup", default="",
                        help="soups to score beside the variants, each a '+'-joined list of variants already "
                             "trained under --out (e.g. syn-10+labeled-only,syn-30+syn-50): the uniform average "
                             "of their LoRA updates (ray_e5.model.soup)")
    parser.add_argument("--skip-train", action="store_true", help="score the embedders already under --out")
    parser.add_argument("--keep-trained", action="store_true",
                        help="train only the variants without an embedder under --out yet (a run cut short goes on)")
    parser.add_argument("--no-baselines", action="store_true", help="leave out base Gemma and MiniLM")
    parser.add_argument("--base-last", action="store_true", help="also score base Gemma with last-token pooling")
    parser.add_argument("--no-base", action="store_true", help="leave out base Gemma (MiniLM stays)")
    parser.add_argument("--english-only", action="store_true",
                        help="score only the English tasks (the bar's suite), not the multilingual ones beside it")
    args = parser.parse_args()
    out = Path(args.out).resolve()
    names = [n.strip() for n in args.variants.split(",") if n.strip()]
    unknown = sorted(set(names) - set(VARIANTS))
    if unknown:
        parser.error(f"unknown variants {unknown}; accepted: {', '.join(VARIANTS)}")

    from ray_e5.config import apply_overrides, check_config, RayE5Config, read_yaml
    from ray_e5.evaluate.local_tasks import read_task_json
    from ray_e5.evaluate.run import evaluate
    from ray_e5.train.run import train

    walls: dict[str, float] = {}
    for name in names:
        config = variant_config(Path(args.config), name, out, args.train_min, args.synthetic_from)
        if args.keep_trained and (out / name / "embedder").is_dir():
            print(f"[quality] {name}: keeping the embedder already trained under {out / name}", flush=True)
        elif not args.skip_train:
            began = time.perf_counter()
            print(f"[quality] training {name} ({' '.join(VARIANTS[name]) or 'the recipe'})", flush=True)
            train(config)
            walls[name] = round(time.perf_counter() - began, 1)
    recipe = read_yaml(Path(args.config))
    soups = [s.strip() for s in args.soup.split(",") if s.strip()]
    if soups:
        from ray_e5.model.soup import soup

        for name in soups:
            soup([out / part / "embedder" for part in name.split("+")], out / f"soup-{name}" / "embedder")
            print(f"[quality] soup-{name}: the average of {name.replace('+', ', ')}", flush=True)
    # scored as the recipe scores its trained model: 256 tokens, bf16 with the adapter merged where the CPU has it
    trained = recipe["evaluate"]["models"][0]
    models = [{"label": n, "model": str(out / n / "embedder"), "max_length": trained.get("max_length", 256),
               "dtype": trained.get("dtype", "auto"), "instructions": n != "no-instruction"}
              for n in names + [f"soup-{s}" for s in soups]]
    if not args.no_baselines:
        models += ([{"label": "gemma3-270m-last", "model": "gemma3-270m", "pooling": "last", "max_length": 128}]
                   if args.base_last else [])
        models += ([] if args.no_base else
                   [{"label": "gemma3-270m-mean", "model": "gemma3-270m", "pooling": "mean", "max_length": 128}])
        models += [{"label": "minilm-l6", "model": "minilm-l6", "max_length": 256}]
    data = dict(recipe)
    data["evaluate"] = {**recipe["evaluate"], "models": models}
    if args.english_only:
        data_dir = (ROOT / recipe.get("data_dir", "../shared/data")).resolve()
        data["evaluate"]["tasks"] = [t for t in recipe["evaluate"]["tasks"]
                                     if read_task_json(data_dir / t["path"], t["path"]).get("language", "en") == "en"]
    apply_overrides(data, [f"run_dir={out}", f"data_dir={(ROOT / recipe.get('data_dir', '../shared/data')).resolve()}"])
    began = time.perf_counter()
    report = evaluate(check_config(data, RayE5Config)).report
    eval_s = time.perf_counter() - began
    tasks = [t["name"] for t in report["tasks"]]
    avg = report.get("english_average") or report["average"]
    header = f"{'model':26s} {'en avg':>7s} " + " ".join(f"{t[:10]:>10s}" for t in tasks) + f" {'train s':>8s}"
    print("\n" + header + "\n" + "-" * len(header))
    for m in report["models"]:
        lab = m["label"]
        cells = " ".join(f"{report['scores'][lab][t]:10.2f}" if report["scores"][lab][t] is not None else f"{'-':>10s}"
                         for t in tasks)
        score = f"{avg[lab]:7.2f}" if avg.get(lab) is not None else f"{'-':>7s}"
        print(f"{lab:26s} {score} {cells} {walls.get(lab, ''):>8}")
    print(f"\nevaluation {eval_s:.0f} s; report {report.get('paths', {}).get('markdown')}")
    (out / "levers.json").write_text(json.dumps({"train_seconds": walls, "eval_seconds": round(eval_s, 1),
                                                 "english_average": avg, "scores": report["scores"]}, indent=2))


if __name__ == "__main__":
    main()
