"""bench/gpu_check.sh --dry-run: the GPU check's own code, on this CPU at a tiny size, without Ray, vLLM or DeepSpeed."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[1]
SCRIPT = ROOT / "bench" / "gpu_check.sh"
CHECKS = ("batch invariance (bf16)", "export parity (fp32)", "serve forward (bf16)",
          "train step (LoRA + InfoNCE + gradient cache, bf16, checkpointing)")


def _run(*args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHON": sys.executable, "HF_HUB_OFFLINE": "1"}
    return subprocess.run(["bash", str(SCRIPT), *args], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=timeout)


@pytest.mark.slow  # imports torch, transformers, peft and sentence-transformers, then trains a step (about 40 s)
def test_dry_run_passes_every_check(tmp_path):
    out = tmp_path / "gpu_check.json"
    proc = _run("--dry-run", "--out", str(out))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    lines = [line for line in proc.stdout.splitlines() if line.startswith("[gpu_check] ")]
    for check in CHECKS:
        assert any(line.startswith(f"[gpu_check] {check}: ") and line.endswith(" PASS") for line in lines), check
    figures = json.loads(out.read_text())
    assert figures["failures"] == [] and figures["device"] == "cpu (dry run)"
    assert figures["batch_invariance"]["min_cosine"] >= 0.999
    assert figures["export_parity"]["min_cosine"] >= 0.9999
    serve = figures["serve_forward"]
    assert serve["seq"] == 64 and serve["tokens_per_s"] > 0 and serve["vector_dtype"] == "torch.float32"
    train = figures["train_step"]
    assert train["tokens"] > 0 and train["seconds"] > 0 and 0 < train["mfu"] < train["hfu"] < 1
    assert 0 < train["lora_parameters"] < train["parameters"]
    assert len(train["losses"]) == 3 and all(math.isfinite(x) for x in train["losses"])
    assert train["losses"][-1] != train["losses"][0]  # the optimiser stepped


def test_without_a_gpu_and_without_dry_run_it_says_so():
    proc = _run(timeout=300)
    if proc.returncode == 0:
        pytest.skip("this machine has a CUDA device: the no-GPU message cannot be produced here")
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "no CUDA device: run with --dry-run" in proc.stderr


def test_the_check_cannot_import_ray_vllm_or_deepspeed():
    """The device has none of them: the script makes them unimportable before importing ray_e5 (so the dry run on
    CPU fails if any module it uses imports one at module level)."""
    source = (ROOT / "bench" / "gpu_check.py").read_text()
    guard = source.index('sys.modules[_name] = None')
    assert guard < source.index("from ray_e5")
    probe = ("import runpy, sys; sys.argv = ['gpu_check', '--help']\n"
             "try:\n    runpy.run_path('bench/gpu_check.py', run_name='__main__')\nexcept SystemExit:\n    pass\n"
             "for name in ('ray', 'vllm', 'deepspeed'):\n"
             "    try:\n        __import__(name)\n    except ImportError:\n        print('refused', name)\n")
    proc = subprocess.run([sys.executable, "-c", probe], cwd=ROOT, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1"})
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert [line for line in proc.stdout.splitlines() if line.startswith("refused")] == \
        ["refused ray", "refused vllm", "refused deepspeed"]
