"""Activation quantization (the "A8" of W8A8): int8 or FP8 E4M3, symmetric, with a scale per
token computed on the fly (dynamic) or one calibrated scale per tensor (static).

The reference path simulates the integer kernel: ``x`` is rounded to the grid and multiplied
back by its scale before the matmul. ``Q(x) W_q^T * s_x s_w`` equals
``(Q(x) s_x) (W_q s_w)^T`` in exact arithmetic, so results match an int8 GEMM up to float32
accumulation order.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from llmpress.quant.primitives import FP8, FP8_MAX

ACT_STRATEGIES = ("token", "tensor")


@dataclass(frozen=True)
class ActScheme:
    bits: int = 8
    type: str = "int"  # int | float (FP8 E4M3)
    strategy: str = "token"  # token: one scale per row of x; tensor: one scale
    dynamic: bool = True  # static needs a calibrated scale (strategy tensor)

    def __post_init__(self) -> None:
        if self.bits != 8:
            raise ValueError(f"act_bits={self.bits!r} is not supported; activations are quantized to 8 bits")
        if self.type not in ("int", "float"):
            raise ValueError(f"act_type={self.type!r}; allowed: int, float")
        if self.strategy not in ACT_STRATEGIES:
            raise ValueError(f"act_strategy={self.strategy!r}; allowed: {ACT_STRATEGIES}")
        if not self.dynamic and self.strategy != "tensor":
            raise ValueError("static activation scales are per tensor: use act_strategy tensor or act_dynamic true")

    @property
    def qmax(self) -> float:
        """Scale divisor: ``amax / qmax``. For int8 this is compressed-tensors' symmetric
        convention (half the integer range, 127.5), so transformers reproduces our outputs."""
        return FP8_MAX if self.type == "float" else 127.5

    def describe(self) -> str:
        return f"{'fp8' if self.type == 'float' else 'int8'} {'dynamic' if self.dynamic else 'static'} per-{self.strategy}"

    def ct_args(self) -> dict:
        return {"num_bits": 8, "type": self.type, "symmetric": True, "strategy": self.strategy,
                "dynamic": self.dynamic, "group_size": None, "actorder": None, "block_structure": None,
                "observer": None if self.dynamic else "minmax", "observer_kwargs": {}}


def static_scale(amax: torch.Tensor, a: ActScheme) -> torch.Tensor:
    """The per-tensor scale for inputs whose largest magnitude is ``amax``."""
    return (amax.float().reshape(1) / a.qmax).clamp(min=torch.finfo(torch.float32).tiny)


def fake_quant(x: torch.Tensor, a: ActScheme, scale: torch.Tensor | None = None) -> torch.Tensor:
    """``Q(x) * s`` in ``x``'s dtype; ``scale`` is required for static schemes."""
    xf = x.float()
    if a.dynamic:
        amax = xf.abs().amax(dim=-1, keepdim=True) if a.strategy == "token" else xf.abs().amax()
        s = (amax / a.qmax).clamp(min=torch.finfo(torch.float32).tiny)
    else:
        if scale is None:
            raise ValueError("static activation quantization needs a calibrated input scale")
        s = scale.float()
    y = xf / s
    y = y.clamp(-FP8_MAX, FP8_MAX).to(FP8).float() if a.type == "float" else torch.round(y).clamp_(-128, 127)
    return (y * s).to(x.dtype)
