"""Fused projections for decoding: q/k/v as one matmul and gate/up as one, for any transformers
decoder whose attention and MLP modules name them ``q_proj`` / ``k_proj`` / ``v_proj`` and
``gate_proj`` / ``up_proj`` (Llama, Mistral, Qwen2/3, Gemma, Phi-3's attention is fused already).

At batch 1 each projection is a GEMV whose fixed cost (launch, ramp-up, tail) is a large share
of its time; one matmul over the stacked weights reads the same bytes in fewer, larger kernels.
The modules stay in the model under their own names (state dict, hooks, LoRA targets and saving
see the same tree): the first member of a group computes the stacked product and keeps its
parts, and the others return their part when they are called on the same input tensor (the
order transformers uses); called on any other input, a member computes its own part again, so
the result never depends on the call order. Where gradients are wanted (an input or a member
parameter that requires one), each member runs its own forward.

Dense ``nn.Linear`` members keep their parameters, which become views into the stacked weight
(no extra memory; ``save_pretrained`` clones such views when it saves). Integer-quantized members
(:class:`~llmpress.nn.QuantLinear`, weight-only) share one stacked kernel layout built from their
packed weights; their codes and scales are left as they are. :func:`unfuse_projections` undoes
both.
"""

from __future__ import annotations

import logging
import types
import weakref

import torch
import torch.nn.functional as F
from torch import nn

log = logging.getLogger(__name__)

GROUPS = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"))
_ATTR = "_llmpress_fusion"
_FUSIONS: weakref.WeakValueDictionary[int, Fusion] = weakref.WeakValueDictionary()  # the compiled op's handles


class Fusion:
    """One group's stacked matmul; ``sizes`` are the members' output widths in order."""

    def __init__(self, sizes: list[int], weight: torch.Tensor | None = None, packed=None,
                 bias: torch.Tensor | None = None) -> None:
        self.sizes = sizes
        self.weight, self.packed, self.bias = weight, packed, bias
        self.handle = id(self)
        self._x: torch.Tensor | None = None
        self._parts: tuple[torch.Tensor, ...] | None = None

    def matmul(self, x: torch.Tensor) -> torch.Tensor:
        if self.weight is not None:
            return F.linear(x, self.weight, self.bias)
        if torch.compiler.is_compiling():  # opaque to the compiler, like the compressed linears
            return torch.ops.llmpress.packed_linear(x, self.handle)
        return _packed_matmul(x, self.packed, self.bias)

    def part(self, i: int, x: torch.Tensor) -> torch.Tensor:
        """Member ``i``'s output for ``x``: from the kept parts when they were computed for this
        very tensor, else from a new stacked product."""
        if self._x is not x:
            self._x, self._parts = x, self.matmul(x).split(self.sizes, dim=-1)
        out = self._parts[i]
        if i == len(self.sizes) - 1:  # the last member: let the input and parts go
            self._x = self._parts = None
        return out


def _packed_matmul(x: torch.Tensor, p, bias: torch.Tensor | None) -> torch.Tensor:
    from llmpress import kernels
    from llmpress.kernels.layout import reference_matmul

    if x.is_cuda and kernels.mode() != "reference" and kernels.triton_available():
        from llmpress.kernels.triton_wa16 import matmul

        return matmul(x, p, bias)
    return reference_matmul(x, p, bias)


@torch.library.custom_op("llmpress::packed_linear", mutates_args=())
def _packed_linear(x: torch.Tensor, handle: int) -> torch.Tensor:
    fu = _FUSIONS[handle]
    return _packed_matmul(x, fu.packed, fu.bias)


@_packed_linear.register_fake
def _(x: torch.Tensor, handle: int) -> torch.Tensor:
    return x.new_empty(*x.shape[:-1], sum(_FUSIONS[handle].sizes))


def _member_forward(self: nn.Module, x: torch.Tensor) -> torch.Tensor:
    fu, i = self.__dict__[_ATTR]
    if torch.is_grad_enabled() and (x.requires_grad or any(p.requires_grad for p in self.parameters())):
        return type(self).forward(self, x)  # training: the member's own forward, so gradients reach its parameters
    if fu.packed is not None and x.dtype != fu.packed.scale.dtype:
        return type(self).forward(self, x)  # the stacked layout was packed for another activation dtype
    return fu.part(i, x)


def _alike(ms: list[nn.Module], key) -> bool:
    return all(key(m) == key(ms[0]) for m in ms)


def _dense(ms: list[nn.Module]) -> Fusion | None:
    if any(type(m) is not nn.Linear for m in ms) or not _alike(
            ms, lambda m: (m.weight.dtype, m.weight.device, m.in_features, m.bias is None)):
        return None  # (type first: a compressed linear's ``weight`` dequantizes)
    sizes = [m.out_features for m in ms]
    with torch.no_grad():
        w = torch.cat([m.weight.detach() for m in ms], 0)
        b = None if ms[0].bias is None else torch.cat([m.bias.detach() for m in ms], 0)
        for m, part in zip(ms, w.split(sizes, 0)):
            m.weight.data = part  # the same Parameter, now a view into the stacked weight
        if b is not None:
            for m, part in zip(ms, b.split(sizes, 0)):
                m.bias.data = part
    return Fusion(sizes, weight=w, bias=b)


def _quant(ms: list[nn.Module], dtype: torch.dtype) -> Fusion | None:
    from llmpress import kernels
    from llmpress.kernels import layout
    from llmpress.nn import QuantLinear

    if any(type(m) is not QuantLinear or m.act is not None for m in ms) or not _alike(
            ms, lambda m: (m.scheme, m.in_features, m.bias is None)):
        return None
    dev = ms[0].scale.device
    try:
        parts = [kernels.packed_for(m, dev, dtype) for m in ms]
        p = layout.cat(parts)
    except layout.UnsupportedLayout as e:
        log.info("projections not fused: %s", e)
        return None
    for m in ms:  # the members' own packs: rebuilt only if a member is ever called alone
        m.__dict__.pop("_kernel_cache", None)
    b = None if ms[0].bias is None else torch.cat([m.bias.detach().to(dtype) for m in ms], 0)
    return Fusion([m.out_features for m in ms], packed=p, bias=b)


def fuse_projections(model: nn.Module, dtype: torch.dtype | None = None) -> int:
    """Fuse every q/k/v and gate/up group of ``model`` whose members are all dense ``nn.Linear``
    of one dtype, or all weight-only :class:`~llmpress.nn.QuantLinear` of one scheme (packed for
    activations of ``dtype``, default the model's first floating parameter's). Returns the number
    of groups fused; groups already fused are left alone."""
    if dtype is None:
        dtype = next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)
    n = 0
    for parent in list(model.modules()):
        for names in GROUPS:
            ms = [getattr(parent, nm, None) for nm in names]
            if any(not isinstance(m, nn.Module) for m in ms) or any(_ATTR in m.__dict__ for m in ms):
                continue
            fu = _dense(ms) or _quant(ms, dtype)
            if fu is None:
                continue
            _FUSIONS[fu.handle] = fu
            for i, m in enumerate(ms):
                m.__dict__[_ATTR] = (fu, i)
                m.forward = types.MethodType(_member_forward, m)
            n += 1
    log.info("fused %d projection groups", n)
    return n


def unfuse_projections(model: nn.Module) -> int:
    """Undo :func:`fuse_projections`: members compute alone again, dense parameters get their
    own storage back. Returns the number of groups undone."""
    done = set()
    for m in model.modules():
        entry = m.__dict__.pop(_ATTR, None)
        if entry is None:
            continue
        fu, _ = entry
        m.__dict__.pop("forward", None)
        if type(m) is nn.Linear:
            with torch.no_grad():
                m.weight.data = m.weight.detach().clone()
                if m.bias is not None:
                    m.bias.data = m.bias.detach().clone()
        if fu.handle not in done:
            done.add(fu.handle)
            _FUSIONS.pop(fu.handle, None)
    return len(done)
