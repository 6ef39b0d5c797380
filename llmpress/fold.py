"""Which op produces each linear layer's input, and how to move a per-channel scale into it.

AWQ and SmoothQuant multiply the input columns of the linears that read one tensor ``x`` by
``s`` and divide the op that produced ``x`` by ``s``; the float model is unchanged. This module
finds those producer -> consumers groups in a decoder block by tracing one forward pass
(a linear whose input *is* a norm's output tensor reads that norm), plus the linear -> linear
pairs that attention and gated MLPs make (value -> output projection, up -> down projection),
and applies the fold. Every fold is checked by re-running the block: a fold that changes the
float output (an architecture this does not understand) is undone and reported.
"""

from __future__ import annotations

import logging
from collections import defaultdict
from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

from llmpress.models import _is_linear, linear_weight
from llmpress.quant.awq import expand_scale

log = logging.getLogger(__name__)

# consumer leaf name -> producer leaf name in the same parent module, where the path between
# them is linear per channel (attention mixes tokens, not channels; a gated MLP multiplies
# up_proj's output elementwise by act(gate_proj(x)))
LINEAR_PAIRS = {"o_proj": "v_proj", "out_proj": "v_proj", "down_proj": "up_proj", "w2": "w3"}


@dataclass(frozen=True)
class ScaleGroup:
    """Linears (names relative to the block) that read one tensor, and the op producing it."""

    linears: tuple[str, ...]
    prev: str | None = None  # producer's name in the block; None: no foldable producer
    kind: str = ""  # "norm" | "gemma_norm" | "linear"
    rep: int = 1  # consumer inputs per producer output (grouped-query attention)
    head_dim: int | None = None

    @property
    def foldable(self) -> bool:
        return self.prev is not None


def _is_norm(m: nn.Module) -> bool:
    w = getattr(m, "weight", None)
    return (
        "norm" in type(m).__name__.lower()
        and not list(m.children())
        and isinstance(w, torch.Tensor)
        and w.dim() == 1
    )


def trace(block: nn.Module, run: Callable[[], torch.Tensor]) -> tuple[list[ScaleGroup], torch.Tensor]:
    """Groups of linears sharing an input, each with its producer if it can take a fold.
    ``run`` executes the block once; its output is returned (the float reference)."""
    mods = dict(block.named_modules())
    keep: list[torch.Tensor] = []  # hold traced tensors so their ids stay unique
    norm_out: dict[int, str] = {}
    lin_in: dict[int, list[str]] = defaultdict(list)
    hooks = []
    for name, m in mods.items():
        if _is_norm(m):
            def on_norm(mod, a, out, name=name):
                keep.append(out)
                norm_out[id(out)] = name
            hooks.append(m.register_forward_hook(on_norm))
        elif name and _is_linear(m):
            def on_lin(mod, a, name=name):
                keep.append(a[0])
                lin_in[id(a[0])].append(name)
            hooks.append(m.register_forward_pre_hook(on_lin))
    try:
        with torch.inference_mode():
            ref = run()
    finally:
        for h in hooks:
            h.remove()
    groups = []
    for key, names in lin_in.items():
        names = tuple(dict.fromkeys(names))  # a linear called twice on the same input counts once
        if key in norm_out:
            prev = norm_out[key]
            kind = "gemma_norm" if "gemma" in type(mods[prev]).__name__.lower() else "norm"
            groups.append(ScaleGroup(names, prev, kind))
            continue
        groups.append(_linear_pair(names, mods) or ScaleGroup(names))
    keep.clear()
    return groups, ref


def _linear_pair(names: tuple[str, ...], mods: dict[str, nn.Module]) -> ScaleGroup | None:
    if len(names) != 1:
        return None
    parent, _, leaf = names[0].rpartition(".")
    if leaf not in LINEAR_PAIRS:
        return None
    prev = f"{parent}.{LINEAR_PAIRS[leaf]}" if parent else LINEAR_PAIRS[leaf]
    if prev not in mods or not _is_linear(mods[prev]):
        return None
    c_in = linear_weight(mods[names[0]]).shape[1]
    p_out = linear_weight(mods[prev]).shape[0]
    if c_in == p_out:
        return ScaleGroup(names, prev, "linear")
    head_dim = getattr(mods.get(parent), "head_dim", None)
    if c_in % p_out or not isinstance(head_dim, int) or p_out % head_dim:
        return None
    return ScaleGroup(names, prev, "linear", rep=c_in // p_out, head_dim=head_dim)


def producer_channels(group: ScaleGroup, block: nn.Module) -> int:
    m = block.get_submodule(group.prev)
    return linear_weight(m).shape[0] if group.kind == "linear" else m.weight.shape[0]


@torch.no_grad()
def apply(block: nn.Module, group: ScaleGroup, s: torch.Tensor) -> None:
    """Multiply the consumers' input columns by ``s`` (expanded for grouped heads) and divide
    the producer's output channels by ``s``."""
    se = expand_scale(s, group.rep, group.head_dim)
    for name in group.linears:
        w = linear_weight(block.get_submodule(name))
        w.mul_(se.to(w.dtype))  # [N, K] * [K]
    prev = block.get_submodule(group.prev)
    if group.kind == "linear":
        linear_weight(prev).div_(s.to(prev.weight.dtype).unsqueeze(1))  # rows: output channels
    elif group.kind == "gemma_norm":  # y = x * (1 + w)
        prev.weight.copy_((1 + prev.weight) / s.to(prev.weight.dtype) - 1)
    else:
        prev.weight.div_(s.to(prev.weight.dtype))
    b = getattr(prev, "bias", None)
    if isinstance(b, torch.Tensor):
        b.div_(s.to(b.dtype))


def snapshot(block: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in block.state_dict().items()}


@torch.no_grad()
def restore(block: nn.Module, saved: dict[str, torch.Tensor]) -> None:
    for k, v in block.state_dict().items():
        v.copy_(saved[k])


def same_output(ref: torch.Tensor, out: torch.Tensor, tol: float = 1e-3) -> tuple[bool, float]:
    rel = float((out.float() - ref.float()).norm() / ref.float().norm().clamp(min=1e-12))
    return rel <= tol, rel
