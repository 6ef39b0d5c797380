"""KV-cache quantization: keys and values are rounded to int8 or FP8 E4M3 as they enter the
cache (after RoPE, as a serving engine stores them) and every attention step reads the rounded
values, during evaluation and generation alike.

Granularity: ``token`` (one scale per token over all heads) or ``head`` (one scale per token
and head). Reference path: the cache stores the dequantized values, so memory is not saved
here; what it measures is the quality effect, which is what a kernel with real 8-bit storage
reproduces.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers import DynamicCache

from llmpress.quant.primitives import FP8, FP8_MAX


@dataclass(frozen=True)
class KVScheme:
    type: str = "int"  # int (int8, symmetric) | float (fp8 e4m3)
    granularity: str = "head"  # head | token

    def __post_init__(self) -> None:
        if self.type not in ("int", "float"):
            raise ValueError(f"kv type={self.type!r}; allowed: int (int8), float (fp8)")
        if self.granularity not in ("head", "token"):
            raise ValueError(f"kv granularity={self.granularity!r}; allowed: head, token")

    def describe(self) -> str:
        return f"kv {'int8' if self.type == 'int' else 'fp8'} per-{self.granularity}"

    @classmethod
    def parse(cls, spec: str) -> KVScheme:
        """``int8``, ``fp8``, ``int8-token``, ``fp8-head`` ..."""
        t, _, g = spec.partition("-")
        if t not in ("int8", "fp8"):
            raise ValueError(f"--kv-cache {spec!r}: expected int8 or fp8, optionally -head or -token")
        return cls("int" if t == "int8" else "float", g or "head")


def fake_quant_kv(x: torch.Tensor, s: KVScheme) -> torch.Tensor:
    """Round ``x`` [batch, heads, seq, head_dim] to the scheme's grid and back."""
    xf = x.float()
    if s.granularity == "head":
        amax = xf.abs().amax(dim=-1, keepdim=True)  # [B, H, S, 1]
    else:
        amax = xf.abs().amax(dim=(1, 3), keepdim=True)  # [B, 1, S, 1]
    qmax = FP8_MAX if s.type == "float" else 127.0
    scale = (amax / qmax).clamp(min=torch.finfo(torch.float32).tiny)
    y = xf / scale
    y = y.clamp(-FP8_MAX, FP8_MAX).to(FP8).float() if s.type == "float" else torch.round(y).clamp_(-127, 127)
    return (y * scale).to(x.dtype)


class QuantizedKVCache(DynamicCache):
    """A DynamicCache whose keys and values are rounded by :func:`fake_quant_kv` on insert."""

    def __init__(self, scheme: KVScheme, **kw) -> None:
        super().__init__(**kw)
        self.kv_scheme = scheme

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args, **kwargs):
        return super().update(fake_quant_kv(key_states, self.kv_scheme), fake_quant_kv(value_states, self.kv_scheme),
                              layer_idx, *args, **kwargs)
