"""LoRA adapters through peft."""

from __future__ import annotations

from peft import LoraConfig, PeftModel, get_peft_model

from ray_e5.config import LoraSettings


def add_lora(backbone, settings: LoraSettings) -> PeftModel:
    """Wrap the backbone with fresh LoRA adapters; afterwards only adapter weights require grad."""
    config = LoraConfig(
        r=settings.r,
        lora_alpha=settings.alpha,
        lora_dropout=settings.dropout,
        target_modules=settings.target_modules,
        bias="none",
    )
    return get_peft_model(backbone, config)


def load_lora(backbone, adapter_dir: str, trainable: bool = False) -> PeftModel:
    return PeftModel.from_pretrained(backbone, adapter_dir, is_trainable=trainable)
