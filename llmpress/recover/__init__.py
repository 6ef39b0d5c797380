"""Recovery after compression: LoRA / QLoRA adapters on the frozen compressed model, trained by
knowledge distillation from the original model; PEFT-compatible adapters or merged weights."""

from llmpress.recover.lora import (
    LoRALinear, add_lora, load_adapter, lora_modules, merge_lora, save_adapter,
)
from llmpress.recover.train import RecoverConfig, RecoverReport, kd_loss, recover

__all__ = ["LoRALinear", "add_lora", "load_adapter", "lora_modules", "merge_lora", "save_adapter",
           "RecoverConfig", "RecoverReport", "kd_loss", "recover"]
