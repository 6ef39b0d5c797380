"""LoRA adapters on any linear of a (compressed) model: a frozen base (nn.Linear, QuantLinear,
CodebookLinear, a pruned dense linear...) plus a trainable low-rank update,
y = base(x) + (alpha / r) · B A x (Hu et al. 2021). On a quantized base this is QLoRA (Dettmers et
al. 2023): the 4-bit weights stay 4-bit and only A and B are trained.

Adapters save in PEFT's layout (``adapter_config.json`` + ``adapter_model.safetensors`` with
``base_model.model.<name>.lora_A.weight`` keys), which ``peft.PeftModel.from_pretrained`` loads
on the original base model; or they merge into dense weights.
"""

from __future__ import annotations

import json
import logging
import math
import os
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from llmpress.models import block_linears, find_blocks, set_submodule

log = logging.getLogger(__name__)


class LoRALinear(nn.Module):
    """A frozen ``base`` linear plus a trainable rank-``r`` update scaled by ``alpha / r``."""

    def __init__(self, base: nn.Module, r: int = 16, alpha: float = 32.0, dropout: float = 0.0) -> None:
        super().__init__()
        if r < 1:
            raise ValueError(f"LoRA rank r={r} must be >= 1")
        self.base = base
        for p in base.parameters():
            p.requires_grad_(False)
        self.in_features, self.out_features = base.in_features, base.out_features
        ref = next((t for t in list(base.parameters()) + list(base.buffers()) if t.is_floating_point()), None)
        dev = ref.device if ref is not None else torch.device("cpu")
        self.lora_A = nn.Linear(self.in_features, r, bias=False, device=dev, dtype=torch.float32)
        self.lora_B = nn.Linear(r, self.out_features, bias=False, device=dev, dtype=torch.float32)
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))  # PEFT's default init
        nn.init.zeros_(self.lora_B.weight)
        self.r, self.alpha = r, alpha
        self.scaling = alpha / r
        self.drop = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

    @property
    def delta(self) -> torch.Tensor:
        """The dense update (alpha / r) · B A, [out, in]."""
        return (self.lora_B.weight @ self.lora_A.weight) * self.scaling

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)
        upd = self.lora_B(self.lora_A(self.drop(x).to(self.lora_A.weight.dtype))) * self.scaling
        return y + upd.to(y.dtype)

    def extra_repr(self) -> str:
        return f"r={self.r}, alpha={self.alpha}"


def add_lora(model: nn.Module, r: int = 16, alpha: float = 32.0, dropout: float = 0.0,
             targets: list[str] | None = None) -> list[str]:
    """Wrap the decoder blocks' linears (or those whose short name is in ``targets``, e.g.
    ``["q_proj", "v_proj"]``) with :class:`LoRALinear`; freeze everything else. Returns the
    wrapped module names."""
    for p in model.parameters():
        p.requires_grad_(False)
    path, blocks = find_blocks(model)
    names = []
    for i, block in enumerate(blocks):
        for name, mod in block_linears(block).items():
            if isinstance(mod, LoRALinear) or (targets and name.split(".")[-1] not in targets):
                continue
            full = f"{path}.{i}.{name}"
            set_submodule(model, full, LoRALinear(mod, r, alpha, dropout))
            names.append(full)
    if not names:
        raise ValueError(f"no linear matched targets={targets}")
    model.llmpress_lora = dict(r=r, alpha=alpha, dropout=dropout, targets=sorted({n.split(".")[-1] for n in names}))
    return names


def lora_modules(model: nn.Module) -> dict[str, LoRALinear]:
    return {n: m for n, m in model.named_modules() if isinstance(m, LoRALinear)}


def lora_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """Adapter weights with PEFT's key names."""
    out = {}
    for n, m in lora_modules(model).items():
        out[f"base_model.model.{n}.lora_A.weight"] = m.lora_A.weight.detach().contiguous()
        out[f"base_model.model.{n}.lora_B.weight"] = m.lora_B.weight.detach().contiguous()
    return out


def load_lora_state(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    mods = lora_modules(model)
    for key, t in state.items():
        name, which = key.removeprefix("base_model.model.").rsplit(".lora_", 1)
        if name not in mods:
            raise KeyError(f"adapter weight {key} has no LoRA layer {name} in this model")
        getattr(mods[name], "lora_" + which.split(".")[0]).weight.data.copy_(t)


def save_adapter(model: nn.Module, out: str | os.PathLike, base_model: str | None = None,
                 overwrite: bool = False) -> Path:
    """Write the adapter in PEFT's layout, atomically (a temporary directory renamed into place)."""
    from llmpress.formats.compressed_tensors import atomic_dir

    cfg = getattr(model, "llmpress_lora", None)
    if cfg is None:
        raise ValueError("the model has no LoRA adapters (add_lora first)")
    with atomic_dir(out, overwrite) as tmp:
        save_file(lora_state(model), str(tmp / "adapter_model.safetensors"))
        (tmp / "adapter_config.json").write_text(json.dumps({
            "peft_type": "LORA", "task_type": "CAUSAL_LM", "r": cfg["r"], "lora_alpha": cfg["alpha"],
            "lora_dropout": cfg["dropout"], "target_modules": cfg["targets"], "bias": "none",
            "fan_in_fan_out": False, "init_lora_weights": True, "inference_mode": True,
            "base_model_name_or_path": base_model or getattr(model.config, "_name_or_path", None),
        }, indent=2))
    return Path(out)


def load_adapter(model: nn.Module, src: str | os.PathLike) -> list[str]:
    """Add LoRA layers as ``adapter_config.json`` describes and load their weights (safetensors)."""
    src = Path(src)
    cfg = json.loads((src / "adapter_config.json").read_text())
    if cfg.get("peft_type") != "LORA":
        raise ValueError(f"{src}: peft_type {cfg.get('peft_type')!r} is not LORA")
    names = add_lora(model, cfg["r"], cfg["lora_alpha"], cfg.get("lora_dropout", 0.0), cfg["target_modules"])
    load_lora_state(model, load_file(str(src / "adapter_model.safetensors")))
    return names


def merge_lora(model: nn.Module) -> list[str]:
    """Fold every adapter into its base. A dense base gets W + ΔW (a mask of zeros, where the
    base was pruned, is kept: the update is masked, so sparsity survives). A compressed base
    becomes a dense nn.Linear (dequantized W + ΔW): re-compress it with the original recipe."""
    merged = []
    for name, m in lora_modules(model).items():
        base = m.base
        delta = m.delta.detach()
        if isinstance(base, nn.Linear):
            w = base.weight.data
            mask = (w != 0) if (w == 0).float().mean() > 0.25 else None  # a pruned layer keeps its zeros
            new = w.float() + (delta if mask is None else delta * mask)
            base.weight.data.copy_(new.to(w.dtype))
            set_submodule(model, name, base)
        else:
            w = base.weight.float()
            lin = nn.Linear(m.in_features, m.out_features, bias=getattr(base, "bias", None) is not None,
                            device=w.device, dtype=torch.float32)
            lin.weight.data.copy_(w + delta.to(w.device))
            if lin.bias is not None:
                lin.bias.data.copy_(base.bias.float())
            lin.requires_grad_(False)
            set_submodule(model, name, lin)
        merged.append(name)
    if hasattr(model, "llmpress_lora"):
        del model.llmpress_lora
    return merged
