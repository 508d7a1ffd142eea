"""Training examples per second: ray-e5's Ray Train loop against sentence-transformers' trainer with
MultipleNegativesRankingLoss, on the same model, data, batch size and max length (CPU, one run each).

Both fine-tune the packaged Gemma 3 270M with the same LoRA (r=16, alpha=32, dropout 0.1, all linear layers) on
SNLI triplets (query with the E5 instruction, positive, hard negative), temperature 0.02 (MNRL scale 50), with
the same torch threads. Examples/s is measured the same way for both: examples of steps 2..N over the time from
the end of step 1 to the end of step N (start-up and the first step excluded); end-to-end wall time is printed
too (ours includes starting the Ray Train worker and planning the data).

    python bench/bench_train.py [--steps 8] [--batch-size 32] [--max-length 64] [--threads 2]

A GPU machine adds ``--mfu``: model FLOPs utilisation of the Mistral-7B shape (random weights from its config) with
LoRA, bf16, gradient checkpointing and DeepSpeed ZeRO-3, one GPU (``--shape tiny`` runs the same path on CPU).
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

ROOT = Path(__file__).resolve().parents[1]
DATA = Path(os.environ.get("RAY_E5_SHARED_DATA", ROOT / ".." / "shared" / "data")).resolve()
LORA = {"r": 16, "alpha": 32, "dropout": 0.1}


def ours(args, workdir: Path) -> dict:
    """ray-e5: ``ray_e5.train.run.train`` (Ray Train worker, torch engine, length-grouped chunks)."""
    from ray_e5.config import load_config
    from ray_e5.train.run import train

    overrides = [f"run_dir={workdir / 'ours'}", f"model.max_length={args.max_length}",
                 f"train.batch_size={args.batch_size}", f"train.max_steps={args.steps}", "train.synthetic=false",
                 f"train.sources=[{{path: {DATA / 'snli_triplets' / 'train.jsonl'}}}]", "train.max_time_s=null",
                 f"train.cpus_per_worker={args.threads}", f"train.engine={args.engine}", "train.progress=false",
                 f"train.checkpoint_every={args.steps}", "train.warmup_steps=1"]
    if args.chunk_size:
        overrides.append(f"train.chunk_size={args.chunk_size}")
    config = load_config(ROOT / "configs" / "quickstart.yaml", overrides)
    began = time.perf_counter()
    train(config)
    wall = time.perf_counter() - began
    metrics = [json.loads(x) for x in (workdir / "ours" / "train" / "metrics.jsonl").read_text().splitlines()]
    steps = [m for m in metrics if "loss" in m]
    rate = (len(steps) - 1) * args.batch_size / (steps[-1]["time"] - steps[0]["time"])
    return {"examples_per_s": rate, "wall_s": wall, "steps": len(steps), "last_loss": steps[-1]["loss"]}


def peer(args, workdir: Path) -> dict:
    """sentence-transformers 5: SentenceTransformerTrainer + MultipleNegativesRankingLoss, LoRA via peft."""
    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from sentence_transformers import SentenceTransformer, SentenceTransformerTrainer, SentenceTransformerTrainingArguments
    from sentence_transformers.losses import MultipleNegativesRankingLoss
    from transformers import TrainerCallback

    from ray_e5.model import Embedder
    from ray_e5.model.export import export_sentence_transformers
    from ray_e5.model.template import format_query

    torch.set_num_threads(args.threads)
    base = Embedder.load("gemma3-270m", max_length=args.max_length)
    st_dir = export_sentence_transformers(base, workdir / "st-base")  # last-token pooling, EOS appended, normalise
    model = SentenceTransformer(str(st_dir), device="cpu")
    model.max_seq_length = args.max_length
    model.add_adapter(LoraConfig(r=LORA["r"], lora_alpha=LORA["alpha"], lora_dropout=LORA["dropout"],
                                 target_modules="all-linear"))
    task = json.loads((DATA / "snli_triplets" / "task.json").read_text())["instruction_hint"]
    rows = [json.loads(x) for x in (DATA / "snli_triplets" / "train.jsonl").read_text().splitlines()]
    rows = rows[: args.batch_size * (args.steps + 2)]
    dataset = Dataset.from_dict({"anchor": [format_query(r["query"], task) for r in rows],
                                 "positive": [r["positive"] for r in rows], "negative": [r["negative"] for r in rows]})
    ends: list[float] = []

    class StepTimes(TrainerCallback):
        def on_step_end(self, *a, **k):
            ends.append(time.perf_counter())

    training_args = SentenceTransformerTrainingArguments(
        output_dir=str(workdir / "st-out"), per_device_train_batch_size=args.batch_size, max_steps=args.steps,
        learning_rate=2e-4, warmup_steps=1, weight_decay=0.1, save_strategy="no", report_to="none",
        logging_steps=1, dataloader_drop_last=True, use_cpu=True, seed=0)
    trainer = SentenceTransformerTrainer(model=model, args=training_args, train_dataset=dataset,
                                         loss=MultipleNegativesRankingLoss(model, scale=1 / 0.02),
                                         callbacks=[StepTimes()])
    began = time.perf_counter()
    out = trainer.train()
    wall = time.perf_counter() - began
    rate = (len(ends) - 1) * args.batch_size / (ends[-1] - ends[0])
    return {"examples_per_s": rate, "wall_s": wall, "steps": len(ends), "last_loss": out.training_loss}


def mfu(args) -> None:
    """Model FLOPs utilisation of one DeepSpeed ZeRO-3 worker training LoRA on a Mistral-shaped decoder."""
    import torch
    from transformers import MistralConfig, MistralModel

    from ray_e5.testing.models import build_tokenizer
    from ray_e5.train.engines import make_engine
    from ray_e5.train.loss import InfoNCE
    from ray_e5.train.step import prepare, train_step
    from ray_e5.testing.train import settings as engine_settings

    import torch.distributed as dist

    if args.shape == "mistral-7b":
        config = MistralConfig(vocab_size=32000, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                               num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=32768)
    else:
        config = MistralConfig(vocab_size=32000, hidden_size=256, intermediate_size=512, num_hidden_layers=2,
                               num_attention_heads=4, num_key_value_heads=2)
    gpu = torch.cuda.is_available()
    dtype = "bf16" if gpu else "fp32"
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT="29561", RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
    dist.init_process_group("nccl" if gpu else "gloo", rank=0, world_size=1)
    with tempfile.TemporaryDirectory() as tmp:
        tokenizer = build_tokenizer()
        config.update({"bos_token_id": tokenizer.bos_token_id, "eos_token_id": tokenizer.eos_token_id,
                       "pad_token_id": tokenizer.pad_token_id, "architectures": ["MistralForCausalLM"]})
        with torch.device("cuda" if gpu else "cpu"):
            MistralModel(config).to(torch.bfloat16 if gpu else torch.float32).save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        from ray_e5.config import LoraSettings, ModelSettings
        from ray_e5.model import Embedder

        embedder = Embedder.from_settings(ModelSettings(name=tmp, max_length=args.max_length, dtype=dtype,
                                                        gradient_checkpointing=True,
                                                        lora=LoraSettings(r=16, alpha=32, dropout=0.1)))
    embedder.train()
    # Non-embedding frozen parameters (an embedding lookup costs no FLOPs); attention score FLOPs are not counted.
    n_params = sum(p.numel() for n, p in embedder.named_parameters() if "lora_" not in n and "embed_tokens" not in n)
    engine = make_engine(embedder, engine_settings(engine="deepspeed", zero_stage=3, use_gpu=gpu), 100, dtype,
                         args.batch_size)
    words = "the model learns to embed text so that related passages are near each other".split()
    text = " ".join(words * (args.max_length // len(words) + 1))
    row = {"query": [text] * args.batch_size, "positive": [text] * args.batch_size,
           "negative": [text] * args.batch_size, "task": ["Retrieve"] * args.batch_size}
    texts = prepare(row, 0, 1, embedder.settings.instruction_template, mask_false_negatives=False)
    loss = InfoNCE(temperature=0.02)
    times, tokens = [], 0
    for step in range(args.steps):
        if gpu:
            torch.cuda.synchronize()
        began = time.perf_counter()
        result = train_step(engine, engine.module, texts, loss, chunk_size=args.chunk_size,
                            gradient_cache=bool(args.chunk_size))
        engine.step()
        if gpu:
            torch.cuda.synchronize()
        if step:
            times.append(time.perf_counter() - began)
            tokens += result.tokens
    seconds = sum(times)
    # Model FLOPs per token with frozen weights: forward 2N plus backward to the activations 2N (LoRA's own
    # weight gradients are negligible); recomputation (checkpointing, gradient caching) is not counted.
    flops = 4 * n_params * tokens / seconds
    peak = {"H100": 989e12, "H200": 989e12, "A100": 312e12}
    name = torch.cuda.get_device_name() if gpu else "cpu"
    peak_flops = next((v for k, v in peak.items() if k in name), None)
    print(f"MFU {args.shape}: {n_params / 1e9:.2f}B frozen non-embedding params, {tokens / seconds:.0f} tokens/s, "
          f"{flops / 1e12:.1f} TFLOP/s on {name}"
          + (f", MFU {flops / peak_flops:.1%} of {peak_flops / 1e12:.0f} TFLOP/s bf16 dense" if peak_flops else ""))
    dist.destroy_process_group()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--max-length", type=int, default=64)
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--engine", choices=["torch", "deepspeed"], default="torch")
    parser.add_argument("--chunk-size", type=int, default=None, help="ours: texts per forward (default: config's)")
    parser.add_argument("--mfu", action="store_true", help="GPU: model FLOPs utilisation with ZeRO-3 instead")
    parser.add_argument("--shape", choices=["mistral-7b", "tiny"], default="mistral-7b")
    args = parser.parse_args()
    if args.mfu:
        mfu(args)
        return
    import torch

    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        results = {"ours": ours(args, workdir), "peer": peer(args, workdir)}
    print(f"machine: {os.cpu_count()} CPU cores, torch threads {args.threads}; Gemma 3 270M + LoRA r=16, "
          f"batch {args.batch_size} SNLI triplets, max length {args.max_length}, {args.steps} steps each")
    for name, label in (("ours", "ray-e5 Ray Train loop"), ("peer", "sentence-transformers MNRL")):
        r = results[name]
        print(f"{label:30s} {r['examples_per_s']:7.2f} examples/s  (wall {r['wall_s']:6.1f} s, "
              f"{r['steps']} steps, last loss {r['last_loss']:.3f})")
    ratio = results["ours"]["examples_per_s"] / results["peer"]["examples_per_s"]
    print(f"ratio ray-e5 / sentence-transformers = {ratio:.2f}  (goal >= 1.0)")


if __name__ == "__main__":
    main()
