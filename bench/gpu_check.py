"""One pass over every GPU path that runs without Ray: run by bench/gpu_check.sh (read its header first).

Checks, in order, each printing one `[gpu_check]` line:
1. batch invariance: a tiny decoder Embedder loaded in bf16 (``Embedder.load(dir, dtype="bf16")``) on the device
   gives the same vectors for a text alone and in a padded batch (left and right padding);
2. export parity: a LoRA embedder exported by ``ray-e5 export`` (merged, sentence-transformers layout) and read back
   by sentence-transformers on the device gives our vectors (fp32);
3. serve forward: the replica's forward (``Embedder.__call__`` under inference mode, bf16, batches of
   ``max_batch_tokens`` padded tokens of 512-token texts) on a Mistral-7B-shaped model with random weights:
   tokens/s and the peak memory a replica needs (``configs/serve.yaml`` is sized from it);
4. training step: LoRA r=16 + InfoNCE + gradient caching (``ray_e5.train.step.train_step`` with the plain torch
   engine: one GPU, no DeepSpeed) on the same model with gradient checkpointing, bf16: seconds per step, tokens/s,
   MFU and the peak memory.

MFU counts the model FLOPs a LoRA step needs, 4 N per token (forward 2 N, input-gradient backward 2 N: frozen weights
get no weight gradient) plus attention, over the step's wall time and the chip's dense bf16 peak (989 TFLOP/s for an
H100/H200 SXM; ``--peak-tflops``). The hardware-FLOPs figure adds what the recipe spends on top: gradient caching's
first forward (2 N) and checkpointing's recompute (2 N), 8 N per token.

``--dry-run`` runs the same code on the CPU at a tiny size (a 2-layer, 64-wide decoder, 64-token texts) in seconds.
Nothing here imports Ray, vLLM or DeepSpeed (absent on the device): they are made unimportable first, as there.
Options: --dry-run, --out FILE (the figures as JSON), --peak-tflops F, --layers N (override the 7B shape's 32),
--steps N (timed training steps, default 2), --batch N (training rows per step, default 16).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import tempfile
import time
from pathlib import Path

FORBIDDEN = ("ray", "vllm", "deepspeed")


for _name in FORBIDDEN:  # absent, as on the device: `import ray` fails and find_spec("ray") answers None
    sys.modules[_name] = None  # type: ignore[assignment]

import numpy as np  # noqa: E402
import torch  # noqa: E402

from ray_e5.config import LoraSettings, ModelSettings  # noqa: E402
from ray_e5.model import Embedder  # noqa: E402
from ray_e5.model.lora import add_lora  # noqa: E402
from ray_e5.testing.models import build_tokenizer, tiny_decoder  # noqa: E402

MISTRAL_7B = dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                  num_key_value_heads=8, vocab_size=32000, max_position_embeddings=32768, rope_theta=10000.0,
                  sliding_window=None)
TINY = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            vocab_size=300, max_position_embeddings=1024, sliding_window=None)
WORDS = ("the quick brown fox jumps over lazy dog embeddings map text to vectors that capture meaning retrieve "
         "documents answer question large language models write synthetic training data contrastive learning "
         "pulls positives together pushes negatives apart rockets burn fuel").split()
results: dict = {}
failures: list[str] = []


def say(name: str, line: str, ok: bool | None = None) -> None:
    verdict = "" if ok is None else (" PASS" if ok else " FAIL")
    print(f"[gpu_check] {name}: {line}{verdict}", flush=True)
    if ok is False:
        failures.append(name)


def texts(n: int, words: int, seed: int) -> list[str]:
    rng = np.random.default_rng(seed)
    return [" ".join(rng.choice(WORDS, size=int(rng.integers(max(2, words // 4), words + 1)))) for _ in range(n)]


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def peak_gb(device: torch.device) -> float | None:
    return torch.cuda.max_memory_allocated(device) / 1e9 if device.type == "cuda" else None


def reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)


# ---- 1. batch invariance ----------------------------------------------------------------------------------------
def check_batch_invariance(tiny_dir: Path, device: torch.device) -> None:
    embedder = Embedder.load(str(tiny_dir), dtype="bf16").to(device)
    assert embedder.dtype == torch.bfloat16
    sample = texts(12, 40, seed=1) + [""]
    alone = np.stack([embedder.encode([t])[0] for t in sample])
    worst = 1.0
    for side in ("right", "left"):
        batched = embedder.encode(sample, batch_size=len(sample), padding_side=side)
        worst = min(worst, float(cosines(batched, alone).min()))
    norms = np.linalg.norm(alone, axis=1)
    results["batch_invariance"] = {"min_cosine": worst, "max_norm_error": float(np.abs(norms - 1).max())}
    # bf16 kernels pick other reductions for other batch shapes: cosine 0.999 is the bar, not bit-equality
    say("batch invariance (bf16)", f"min cosine alone vs batched {worst:.6f} (>= 0.999), norms 1 +- "
        f"{results['batch_invariance']['max_norm_error']:.1e}", worst >= 0.999 and np.abs(norms - 1).max() < 1e-5)


# ---- 2. export parity -------------------------------------------------------------------------------------------
def check_export_parity(tiny_dir: Path, work: Path, device: torch.device) -> None:
    from sentence_transformers import SentenceTransformer

    from ray_e5.model.export import export_sentence_transformers

    torch.manual_seed(0)
    embedder = Embedder.from_settings(ModelSettings(name=str(tiny_dir), max_length=48,
                                                    lora=LoraSettings(r=4, alpha=8, dropout=0.0)))
    with torch.no_grad():
        for name, p in embedder.named_parameters():
            if "lora_B" in name:
                p.normal_(0.0, 0.05)
    embedder.save(work / "embedder")
    merged = export_sentence_transformers(work / "embedder", work / "merged")
    sample = texts(16, 60, seed=2)
    ours = Embedder.load(str(work / "embedder"), merge_lora=True).to(device).encode(sample)
    theirs = SentenceTransformer(str(merged), device=str(device)).encode(sample, batch_size=len(sample))
    worst = float(cosines(ours, theirs).min())
    results["export_parity"] = {"min_cosine": worst}
    say("export parity (fp32)", f"min cosine ours vs sentence-transformers {worst:.6f} (>= 0.9999)", worst >= 0.9999)


# ---- 3 and 4: a Mistral-7B-shaped model with random weights ------------------------------------------------------
def big_embedder(shape: dict, device: torch.device, max_length: int) -> Embedder:
    from transformers import AutoModel, MistralConfig

    tokenizer = build_tokenizer()
    config = MistralConfig(**shape, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                           pad_token_id=tokenizer.pad_token_id, architectures=["MistralForCausalLM"])
    torch.manual_seed(0)
    with torch.device(device):
        model = AutoModel.from_config(config, dtype=torch.bfloat16)
    model.eval()
    settings = ModelSettings(name="random-mistral-7b-shape", pooling="last", max_length=max_length, dtype="bf16")
    return Embedder(model, tokenizer, settings, "random-mistral-7b-shape")


def parameters(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def forward_flops_per_token(shape: dict, n_params: int, seq: int) -> float:
    """2 N (matmuls, embeddings excluded) plus attention's QK^T and AV: 4 * layers * seq * hidden per token."""
    embed = shape["vocab_size"] * shape["hidden_size"]
    return 2.0 * (n_params - embed) + 4.0 * shape["num_hidden_layers"] * seq * shape["hidden_size"]


def check_serve_forward(embedder: Embedder, shape: dict, device: torch.device, seq: int, max_batch_tokens: int,
                        batches: int) -> None:
    from ray_e5.model.tokenize import pad

    rows = max(1, max_batch_tokens // seq)
    gen = torch.Generator().manual_seed(3)
    eos = embedder.tokenizer.eos_token_id
    ids = [torch.randint(4, embedder.tokenizer.vocab_size, (seq - 1,), generator=gen).tolist() + [eos]
           for _ in range(rows)]
    batch = {k: v.to(device) for k, v in pad(ids, embedder.tokenizer.pad_token_id, "right").items()}
    reset_peak(device)
    with torch.inference_mode():
        embedder(**batch)  # warm-up
        sync(device)
        began = time.perf_counter()
        for _ in range(batches):
            vectors = embedder(**batch)
        sync(device)
    seconds = time.perf_counter() - began
    tokens = rows * seq * batches
    n = parameters(embedder.backbone)
    flops = forward_flops_per_token(shape, n, seq) * tokens
    results["serve_forward"] = {"seq": seq, "rows_per_batch": rows, "tokens_per_s": tokens / seconds,
                                "texts_per_s": rows * batches / seconds, "achieved_tflops": flops / seconds / 1e12,
                                "peak_memory_gb": peak_gb(device), "parameters": n,
                                "vector_dtype": str(vectors.dtype)}
    r = results["serve_forward"]
    memory = f", peak memory {r['peak_memory_gb']:.1f} GB" if r["peak_memory_gb"] is not None else ""
    say("serve forward (bf16)", f"{r['tokens_per_s']:,.0f} tokens/s = {r['texts_per_s']:,.1f} texts/s of {seq} tokens, "
        f"batches of {rows} ({max_batch_tokens} tokens), {r['achieved_tflops']:.1f} TFLOP/s{memory}; vectors "
        f"{vectors.dtype}", vectors.dtype == torch.float32 and bool(torch.isfinite(vectors).all()))


def check_train_step(embedder: Embedder, shape: dict, device: torch.device, seq: int, batch: int, chunk: int,
                     steps: int, peak_tflops: float) -> None:
    from types import SimpleNamespace

    from ray_e5.train.engines import TorchEngine
    from ray_e5.train.loss import InfoNCE
    from ray_e5.train.step import prepare, train_step

    model = embedder.backbone
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.config.use_cache = False
    torch.manual_seed(0)
    embedder.backbone = add_lora(model, LoraSettings(r=16, alpha=32, dropout=0.1))
    embedder.train()
    opts = SimpleNamespace(lr=1e-4, weight_decay=0.1, warmup_steps=0, grad_clip=None)
    engine = TorchEngine(embedder, opts, total_steps=steps + 1)
    words = seq  # up to `seq` words: most texts are longer than max_length and are truncated to it
    row = {"query": texts(batch, words, 10), "positive": texts(batch, words, 11), "negative": texts(batch, words, 12),
           "task": ["Given a web search query, retrieve relevant passages that answer the query"] * batch}
    step_texts = prepare(row, 0, 1, embedder.settings.instruction_template)
    reset_peak(device)
    times, losses, tokens = [], [], 0
    for i in range(steps + 1):  # the first step warms up (kernels, allocator) and is not timed
        sync(device)
        began = time.perf_counter()
        result = train_step(engine, embedder, step_texts, InfoNCE(temperature=0.02), chunk_size=chunk,
                            gradient_cache=True)
        engine.step()
        sync(device)
        if i:
            times.append(time.perf_counter() - began)
        losses.append(result.loss)
        tokens = result.tokens
    seconds = float(np.median(times))
    n = parameters(embedder._base_model()) - sum(p.numel() for p in engine.params)
    per_token = forward_flops_per_token(shape, n, seq)
    model_flops = 2 * per_token * tokens  # forward + input-gradient backward
    hardware_flops = 4 * per_token * tokens  # + gradient caching's first forward + checkpointing's recompute
    mfu = model_flops / seconds / (peak_tflops * 1e12)
    results["train_step"] = {"rows": batch, "chunk_size": chunk, "tokens": tokens, "seconds": seconds,
                             "tokens_per_s": tokens / seconds, "mfu": mfu,
                             "hfu": hardware_flops / seconds / (peak_tflops * 1e12), "losses": losses,
                             "lora_parameters": sum(p.numel() for p in engine.params), "parameters": n,
                             "peak_memory_gb": peak_gb(device), "peak_tflops": peak_tflops}
    r = results["train_step"]
    grads_ok = all(math.isfinite(x) for x in losses)
    memory = f", peak memory {r['peak_memory_gb']:.1f} GB" if r["peak_memory_gb"] is not None else ""
    say("train step (LoRA + InfoNCE + gradient cache, bf16, checkpointing)",
        f"{seconds:.2f} s/step for {batch} rows x 3 texts ({tokens} tokens, chunks of {chunk}): "
        f"{r['tokens_per_s']:,.0f} tokens/s, MFU {mfu:.1%} (HFU {r['hfu']:.1%} of {peak_tflops:.0f} TFLOP/s)"
        f"{memory}; loss {losses[0]:.3f} -> {losses[-1]:.3f}", grads_ok)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--dry-run", action="store_true", help="the same code on CPU at a tiny size")
    parser.add_argument("--out", help="write the figures as JSON here")
    parser.add_argument("--peak-tflops", type=float, default=989.0, help="the chip's dense bf16 peak (H100/H200 SXM)")
    parser.add_argument("--layers", type=int, help="layers of the 7B-shaped model (default 32)")
    parser.add_argument("--steps", type=int, default=2, help="timed training steps")
    parser.add_argument("--batch", type=int, default=16, help="training rows per step (query, positive, negative)")
    args = parser.parse_args(argv)

    if args.dry_run:
        device, shape, seq, max_batch_tokens, chunk, batches = torch.device("cpu"), dict(TINY), 64, 256, 4, 2
        torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
    else:
        if not torch.cuda.is_available():
            print("[gpu_check] no CUDA device: run with --dry-run on a CPU machine", file=sys.stderr)
            return 2
        device, shape, seq, max_batch_tokens, chunk, batches = torch.device("cuda"), dict(MISTRAL_7B), 512, 16384, 8, 5
        torch.backends.cuda.matmul.allow_tf32 = True
    if args.layers:
        shape["num_hidden_layers"] = args.layers
    batch = 4 if args.dry_run and args.batch == 16 else args.batch
    results["device"] = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu (dry run)"
    results["versions"] = {"torch": torch.__version__, "transformers": __import__("transformers").__version__}
    say("device", f"{results['device']}, torch {torch.__version__}, transformers {results['versions']['transformers']}")
    began = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="gpu_check_") as tmp:
        work = Path(tmp)
        tiny_dir = tiny_decoder(work / "tiny", hidden_size=64, layers=2)
        check_batch_invariance(tiny_dir, device)
        check_export_parity(tiny_dir, work, device)
    embedder = big_embedder(shape, device, max_length=seq)
    say("model", f"{parameters(embedder.backbone) / 1e9:.2f} B parameters, {shape['num_hidden_layers']} layers, "
        f"hidden {shape['hidden_size']}, bf16 on {device}")
    check_serve_forward(embedder, shape, device, seq, max_batch_tokens, batches)
    check_train_step(embedder, shape, device, seq, batch, chunk, args.steps, args.peak_tflops)
    results["seconds"] = time.perf_counter() - began
    results["failures"] = failures
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=2) + "\n")
    say("done", f"{results['seconds']:.1f} s, {len(failures)} failed" + (f": {', '.join(failures)}" if failures else ""))
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
