"""Passkey retrieval sweep (E5-mistral section 5.2) on the real Gemma 3 270M, CPU: accuracy, texts/s, wall time.

Two models: Gemma as shipped (RoPE base 1e6 on its global layers, 1e4 on its local ones, window 512) and the same
weights with the global base ``--rope-factor`` times larger (``model.rope_theta``). Both at ``max_length`` 4096, the
passkey task at 256..4096 tokens with ``--samples`` documents a length (chance 1/samples). Prints a table per
length (accuracy, document tokens, texts/s) and the wall time of each sweep (model load excluded, printed apart);
writes report.json, report.md and passkey.png through the evaluation report under ``--out``.

    python bench/bench_passkey.py                          # 256..4096, 10 documents a length, 2 models
    python bench/bench_passkey.py --lengths 256 1024 --samples 5
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lengths", type=int, nargs="+", default=[256, 512, 1024, 2048, 4096])
    parser.add_argument("--samples", type=int, default=10)
    parser.add_argument("--rope-factor", type=float, default=4.0)
    parser.add_argument("--max-length", type=int, default=4096)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: all cores)")
    parser.add_argument("--out", default="runs/bench-passkey")
    args = parser.parse_args()

    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    from ray_e5.evaluate.encoder import E5Encoder
    from ray_e5.evaluate.passkey import PasskeyTask
    from ray_e5.evaluate.report import build_report, markdown, passkey_chart
    from ray_e5.model import Embedder
    from ray_e5.model.context import rope_theta

    task = PasskeyTask(lengths=sorted(args.lengths), samples=args.samples, seed=42)
    records, models = {}, []
    total = 0.0
    for label, factor in (("gemma3-270m", None), (f"gemma3-270m-rope{args.rope_factor:g}x", args.rope_factor)):
        start = time.perf_counter()
        base = Embedder.load("gemma3-270m", max_length=args.max_length)
        theta = rope_theta(base._base_model().config)
        embedder = base if factor is None else Embedder.load("gemma3-270m", max_length=args.max_length,
                                                             rope_theta=theta * factor)
        load_s = time.perf_counter() - start
        used = rope_theta(embedder._base_model().config)
        start = time.perf_counter()
        record = task.run(E5Encoder(embedder, label), batch_size=8)
        sweep_s = time.perf_counter() - start
        total += sweep_s
        if record["status"] != "ok":
            raise SystemExit(f"{label}: {record['error']}")
        pk = record["passkey"]
        print(f"\n{label}: rope_theta (global layers) {used:g}, sliding_window "
              f"{embedder._base_model().config.sliding_window}, max_length {args.max_length}; load {load_s:.1f}s, "
              f"sweep {sweep_s:.1f}s, torch threads {torch.get_num_threads()}")
        print(f"{'length':>7} {'accuracy':>9} {'doc tokens':>11} {'texts/s':>8} {'seconds':>8}")
        for n in task.lengths:
            k = str(n)
            print(f"{n:>7} {pk['accuracy'][k]:>9.2f} {pk['doc_tokens'][k]:>11.0f} {pk['texts_per_s'][k]:>8.2f} "
                  f"{pk['seconds'][k]:>8.1f}")
        records[label] = {task.name: record}
        models.append({"label": label, "ref": "gemma3-270m", "rope_theta": used})
        del embedder, base
    print(f"\nwhole sweep ({len(models)} models x {len(task.lengths)} lengths x {args.samples} documents + queries): "
          f"{total:.1f}s; chance {1 / args.samples:.2f}")

    report = build_report(models, [{"name": task.name, "type": "Passkey", "main_score": "accuracy", "local": True}],
                          records)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "report.json").write_text(json.dumps({**report, "sweep_seconds": round(total, 1)}, indent=2))
    (out / "report.md").write_text(markdown(report))
    (out / "passkey.png").write_bytes(passkey_chart(report))
    print(f"wrote {out}/report.json, report.md, passkey.png")


if __name__ == "__main__":
    main()
