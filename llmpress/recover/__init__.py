"""Recovery after compression: LoRA / QLoRA adapters on the frozen compressed model,
quantization-aware training, or full distillation into a smaller student, trained by knowledge
distillation from the original model (live, or its top-k logits cached on disk); PEFT-compatible
adapters, merged weights, or the integer model after QAT."""

from llmpress.recover.cache import TeacherCache, cache_teacher, kd_loss_topk
from llmpress.recover.lora import (
    LoRALinear, add_lora, load_adapter, lora_modules, merge_lora, save_adapter,
)
from llmpress.recover.qat import QATLinear, add_qat, export_qat, qat_modules
from llmpress.recover.train import (
    RecoverConfig, RecoverReport, hidden_loss, kd_loss, layer_map, recover, trainable_parameters,
)

__all__ = ["LoRALinear", "add_lora", "load_adapter", "lora_modules", "merge_lora", "save_adapter",
           "QATLinear", "add_qat", "export_qat", "qat_modules",
           "TeacherCache", "cache_teacher", "kd_loss_topk",
           "RecoverConfig", "RecoverReport", "hidden_loss", "kd_loss", "layer_map", "recover",
           "trainable_parameters"]
