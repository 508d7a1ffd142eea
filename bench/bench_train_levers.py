"""Training speed of the one-hour recipe's levers on CPU: the same step (Gemma 3 270M + LoRA, batch 32 SNLI
triplets, 64 tokens, chunks of 16, mean pooling) with LoRA on every layer in fp32 (the baseline), on the top 6
layers only (``model.lora.top_layers``: backward stops at the lowest adapted layer), under bf16 autocast
(``train.cpu_autocast``), both, and both without hard negatives; then the one-hour recipe's own step (the first 14
layers, top 6 adapted, bf16) with its frozen weights in fp32 (autocast casting them in every forward), as the torch
engine runs it (the frozen weights held in bf16), with its frozen layers' outputs replayed for texts seen before
(``train.cache_frozen_layers``: the same batches a second time, every text a hit), and with score distillation from
MiniLM (``train.distill``). Prints examples/s and the ratio to the baseline (best of the steps after the first,
which warms up).

    python bench/bench_train_levers.py [--steps 3] [--only recipe]
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
DATA = Path(os.environ.get("RAY_E5_SHARED_DATA", Path(__file__).resolve().parents[1] / ".." / "shared" / "data"))

CASES = [  # (label, lora.top_layers, train.cpu_autocast, hard negatives, extra: num_layers, cache, distill)
    ("all layers, fp32", None, "off", True, {}),
    ("top 6 layers, fp32", 6, "off", True, {}),
    ("all layers, bf16 autocast", None, "bf16", True, {}),
    ("top 6 layers, bf16 autocast", 6, "bf16", True, {}),
    ("top 6, bf16, no hard negatives", 6, "bf16", False, {}),
    ("recipe, frozen weights cast per forward", 6, "bf16", True, {"num_layers": 14, "recast": True}),
    ("recipe: 14 layers, top 6, bf16", 6, "bf16", True, {"num_layers": 14}),
    ("recipe, frozen layers replayed", 6, "bf16", True, {"num_layers": 14, "cache": True}),
    ("recipe + distill from MiniLM", 6, "bf16", True, {"num_layers": 14, "distill": True}),
]


def examples_per_s(rows, top_layers, autocast: str, negatives: bool, steps: int, batch: int,
                   num_layers: int | None = None, cache: bool = False, distill: bool = False,
                   recast: bool = False) -> float:
    import torch

    from ray_e5.config import ModelSettings
    from ray_e5.model import Embedder
    from ray_e5.train.config import TrainSettings
    from ray_e5.train.engines import build_embedder, hold_frozen_linears_in, make_engine
    from ray_e5.train.layer_cache import FrozenLayerCache
    from ray_e5.train.loss import InfoNCE, ScoreDistillation
    from ray_e5.train.step import prepare, train_step

    model = ModelSettings.model_validate({"name": "gemma3-270m", "pooling": "mean", "max_length": 64,
                                          "num_layers": num_layers,
                                          "lora": {"r": 16, "alpha": 32, "dropout": 0.05, "top_layers": top_layers}})
    settings = TrainSettings.model_validate({"batch_size": batch, "chunk_size": 16, "engine": "torch",
                                             "cpu_autocast": autocast, "hard_negatives": negatives})
    torch.manual_seed(0)
    embedder = build_embedder(model, settings, batch)
    embedder.train()
    engine = make_engine(embedder, settings, 100, "fp32", batch, torch.device("cpu"))
    if recast:  # the engine holds the frozen weights in bf16; back in fp32, autocast casts them in every forward
        hold_frozen_linears_in(embedder, torch.float32)
    loss = InfoNCE(temperature=0.05)
    teacher = None
    if distill:
        loss = ScoreDistillation(loss, 1.0, 0.05, 0.05)
        teacher = Embedder.load("minilm-l6", max_length=256).requires_grad_(False)
    if cache:
        engine = FrozenLayerCache(engine, embedder)
    passes = 2 if cache else 1  # with the cache, the batches once to keep their states, then timed as hits
    times = []
    for p in range(passes):
        for s in range(steps):
            part = rows[s * batch:(s + 1) * batch]
            row = {"query": [r["query"] for r in part], "positive": [r["positive"] for r in part],
                   "negative": [r["negative"] for r in part], "task": ["Retrieve semantically similar text."] * batch}
            began = time.perf_counter()
            texts = prepare(row, 0, 1, model.instruction_template, negatives, True, True)
            train_step(engine, embedder, texts, loss, 16, False, teacher)
            engine.step()
            if p == passes - 1:
                times.append(time.perf_counter() - began)
    return batch / min(times[1:] or times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--only", default="", help="run only the cases whose label contains this text")
    args = parser.parse_args()
    import torch

    torch.set_num_threads(os.cpu_count() or 1)
    from ray_e5.model.precision import cpu_has_native_bf16

    rows = [json.loads(line) for line in (DATA / "snli_triplets" / "train.jsonl").read_text().splitlines()[:400]]
    print(f"{os.cpu_count()} CPU cores; native bf16 (AVX512-BF16/AMX): {cpu_has_native_bf16()}")
    base = None
    for label, top, autocast, negatives, extra in CASES:
        if args.only and args.only not in label and label != CASES[0][0]:
            continue
        rate = examples_per_s(rows, top, autocast, negatives, args.steps, args.batch, **extra)
        base = base or rate
        print(f"{label:34s} {rate:6.2f} examples/s   x{rate / base:.2f} of all layers fp32", flush=True)


if __name__ == "__main__":
    main()
