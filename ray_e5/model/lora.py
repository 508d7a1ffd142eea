"""LoRA adapters through peft."""

from __future__ import annotations

import torch
from peft import LoraConfig, PeftModel, get_peft_model

from ray_e5.settings import LoraSettings
from ray_e5.model.depth import depth


def add_lora(backbone, settings: LoraSettings) -> PeftModel:
    """Wrap the backbone with fresh LoRA adapters; afterwards only adapter weights require grad."""
    layers = None
    if settings.top_layers is not None:
        layers_in_model = depth(getattr(backbone, "config", None))
        if layers_in_model and settings.top_layers < layers_in_model:
            layers = list(range(layers_in_model - settings.top_layers, layers_in_model))
    targets = settings.target_modules
    if layers is not None and targets == "all-linear":  # peft takes layers_to_transform with named modules only
        targets = sorted({name.rsplit(".", 1)[-1] for name, module in backbone.named_modules()
                          if isinstance(module, torch.nn.Linear) and ".layers." in f".{name}"})
    config = LoraConfig(
        r=settings.r,
        lora_alpha=settings.alpha,
        lora_dropout=settings.dropout,
        target_modules=targets,
        bias="none",
        layers_to_transform=layers,
        layers_pattern="layers" if layers is not None else None,
    )
    return get_peft_model(backbone, config)


def load_lora(backbone, adapter_dir: str, trainable: bool = False) -> PeftModel:
    return PeftModel.from_pretrained(backbone, adapter_dir, is_trainable=trainable)
