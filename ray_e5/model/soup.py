"""Weight averaging of LoRA embedders trained from one base ("model soups", Wortsman et al. 2022): one embedder
whose weights are the average of several runs' (runs on different data mixes, or checkpoints of one run).

Averaging the adapters' A and B matrices separately is not averaging the models: (B1 + B2)(A1 + A2) / 4 holds
cross terms B1 A2 that neither run learned. The exact average of the weight updates, sum_i w_i B_i A_i, is itself a
LoRA adapter of rank sum_i r_i: B = [w_1 B_1, ..., w_n B_n] and A = [A_1; ...; A_n] stacked along the rank. That
is what :func:`soup` writes, so the soup loads, serves, merges and exports as any embedder does (peft has
``add_weighted_adapter`` with a "cat" combination that does the same on a loaded model; here the files are combined
directly, without loading the backbone, and the result is a plain embedder directory). Written by hand because
peft's function works on adapters loaded into one model and does not write an embedder's manifest.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Sequence

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
#: adapter settings every ingredient must share for the soup to be one model
SHARED_KEYS = ("base_model_name_or_path", "target_modules", "layers_to_transform", "use_rslora", "use_dora",
               "bias", "modules_to_save")


class SoupError(ValueError):
    """Embedders that cannot be averaged (another base, other adapted modules, no adapter); names what differs."""


def _scale(config: dict) -> float:
    r, alpha = config["r"], config["lora_alpha"]
    return alpha / (r ** 0.5) if config.get("use_rslora") else alpha / r


def soup(embedders: Sequence[str | Path], out: str | Path, weights: Sequence[float] | None = None) -> Path:
    """Write to ``out`` the embedder whose LoRA update is the ``weights``-average (default: uniform) of the
    ``embedders``' (local embedder directories with adapters, all of one base model and adapter layout)."""
    import torch
    from safetensors.torch import load_file, save_file

    from ray_e5.model.embedder import ADAPTER_DIR, EMBEDDER_FILE, is_embedder_dir, rewrite_manifest

    dirs = [Path(e) for e in embedders]
    if len(dirs) < 2:
        raise SoupError(f"a soup needs at least two embedders, got {len(dirs)}")
    weights = [1.0 / len(dirs)] * len(dirs) if weights is None else [float(w) for w in weights]
    if len(weights) != len(dirs) or any(w < 0 for w in weights) or sum(weights) <= 0:
        raise SoupError(f"weights must be {len(dirs)} non-negative numbers with a positive sum, got {weights}")
    manifests, configs, tensors = [], [], []
    for d in dirs:
        if not is_embedder_dir(d) or not (d / ADAPTER_DIR / ADAPTER_WEIGHTS).is_file():
            raise SoupError(f"{d}: not an embedder directory with a LoRA adapter ({EMBEDDER_FILE} and "
                            f"{ADAPTER_DIR}/{ADAPTER_WEIGHTS})")
        manifests.append(json.loads((d / EMBEDDER_FILE).read_text()))
        configs.append(json.loads((d / ADAPTER_DIR / ADAPTER_CONFIG).read_text()))
        tensors.append(load_file(str(d / ADAPTER_DIR / ADAPTER_WEIGHTS)))
    for key in ("base_model", "num_layers", "pooling", "bidirectional"):
        values = {json.dumps(m.get(key)) for m in manifests}
        if len(values) > 1:
            raise SoupError(f"the embedders differ in {key} ({', '.join(sorted(values))}): only runs of one model "
                            "can be averaged")
    for key in SHARED_KEYS:
        # peft writes target_modules from a set: its order says nothing
        values = {json.dumps(sorted(v) if isinstance(v := c.get(key), list) else v, sort_keys=True) for c in configs}
        if len(values) > 1:
            raise SoupError(f"the adapters differ in {key} ({', '.join(sorted(values))}): only adapters of one "
                            "layout can be averaged")
    if len({frozenset(t) for t in tensors}) > 1:
        raise SoupError("the adapters hold different weights (another LoRA layout): only one layout can be averaged")

    rank = sum(c["r"] for c in configs)
    combined = {}
    for name in tensors[0]:
        if ".lora_A." in name:  # (r, in): stacked along the rank
            combined[name] = torch.cat([t[name].float() for t in tensors], dim=0)
        elif ".lora_B." in name:  # (out, r): each run's B times its weight and its own scale over the soup's
            parts = []
            for t, c, w in zip(tensors, configs, weights):
                parts.append(t[name].float() * (w / sum(weights)) * _scale(c))
            combined[name] = torch.cat(parts, dim=1)
        else:
            raise SoupError(f"adapter weight {name}: neither a LoRA A nor B matrix; only LoRA adapters can be averaged")
    config = dict(configs[0])
    config.update({"r": rank, "lora_alpha": rank, "use_rslora": False, "rank_pattern": {}, "alpha_pattern": {}})
    # lora_alpha = r: a scale of 1, each B above already carries its run's own scale
    out = Path(out)
    if out.exists():
        shutil.rmtree(out)
    (out / ADAPTER_DIR).mkdir(parents=True)
    dtype = next(iter(tensors[0].values())).dtype
    save_file({k: v.to(dtype).contiguous() for k, v in combined.items()}, str(out / ADAPTER_DIR / ADAPTER_WEIGHTS))
    (out / ADAPTER_DIR / ADAPTER_CONFIG).write_text(json.dumps(config, indent=2))
    manifest = dict(manifests[0])
    manifest.pop("files", None)
    manifest.pop("revision", None)
    if isinstance(manifest.get("lora"), dict):
        manifest["lora"] = {**manifest["lora"], "r": rank, "alpha": rank}
    manifest["soup"] = {"embedders": [str(d) for d in dirs], "weights": weights}
    (out / EMBEDDER_FILE).write_text(json.dumps(manifest, indent=2) + "\n")
    rewrite_manifest(out)
    return out
