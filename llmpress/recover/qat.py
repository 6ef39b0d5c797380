"""Quantization-aware training (QAT): fine-tune a quantized model through fake-quantized weights
and export the final integer model.

Each :class:`~llmpress.nn.QuantLinear` becomes a :class:`QATLinear` that holds a float weight in
grid units (at the start exactly the layer's integers, so training starts at the compressed
model, e.g. GPTQ's solution), the log of its scales and its integer zero points. The forward pass
rounds the weight onto the grid with a straight-through estimator (the rounding is the identity
in the backward pass; the clamp to the grid's range is not, so weights pushed past the range stop
receiving gradient), as in Bengio et al. 2013 / Jacob et al. 2018. With ``learn_scales`` the
scales are trained too (as in LSQ, Esser et al. 2020, and EfficientQAT, Chen et al. 2024).
:func:`export_qat` rounds the trained weights onto the trained grid and puts ordinary QuantLinear
layers back, so the result saves as the same compressed-tensors checkpoint as the starting model.
"""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F
from torch import nn

from llmpress.nn import QuantLinear
from llmpress.quant.primitives import QuantizedWeight, QuantScheme, _grouped, _per_group, _ungrouped

log = logging.getLogger(__name__)


def _round_ste(x: torch.Tensor) -> torch.Tensor:
    return x + (torch.round(x) - x).detach()


class QATLinear(nn.Module):
    """A trainable weight seen through the integer grid of ``scheme``.

    The weight is held in grid units, ``u = W / s`` (at the start exactly the integers minus
    the zero point), and the scales as ``log s``. An optimizer step of size ``lr`` then moves a
    weight by ``lr`` of a grid step and a scale by a relative ``lr``, whatever the layer's
    magnitude, so one learning rate suits every layer and every model.
    """

    def __init__(self, ql: QuantLinear, learn_scales: bool = False, learn_weights: bool = True) -> None:
        super().__init__()
        sch = ql.scheme
        if sch.type != "int":
            raise ValueError(f"QAT supports integer grids; this layer is {sch.describe()}")
        if ql.zero is not None and ql.zero.dtype != torch.int8:
            raise ValueError("QAT needs integer zero points (HQQ's float zero points are not supported)")
        if ql.act is not None:
            raise ValueError("QAT trains weight-only quantized layers; this one quantizes activations too")
        if not (learn_scales or learn_weights):
            raise ValueError("QAT needs learn_weights or learn_scales (or both)")
        self.scheme: QuantScheme = sch
        self.info = dict(ql.info)
        self.in_features, self.out_features = ql.in_features, ql.out_features
        self.scale_dtype = ql.scale.dtype
        s = ql.scale.detach().float()
        if not (s > 0).all():
            raise ValueError("QAT needs positive scales (a zero scale cannot be trained in log space)")
        q = ql.qdata.detach().float()
        if ql.zero is not None:
            g = _grouped(q, sch)
            q = _ungrouped(g - _per_group(ql.zero, g), q.shape, sch)
        self.u = nn.Parameter(q, requires_grad=False)  # grid units: integers minus zero point
        self.log_scale = nn.Parameter(s.log(), requires_grad=False)
        self.learn_scales, self.learn_weights = learn_scales, learn_weights
        self.register_buffer("zero", None if ql.zero is None else ql.zero.detach().clone())
        self.register_buffer("start_q", ql.qdata.detach().clone(), persistent=False)
        self.register_buffer("start_scale", s.clone(), persistent=False)
        self.bias = None if ql.bias is None else nn.Parameter(ql.bias.detach().clone(), requires_grad=False)

    def trainable(self) -> list[nn.Parameter]:
        return ([self.u] if self.learn_weights else []) + ([self.log_scale] if self.learn_scales else [])

    def _scale(self) -> torch.Tensor:
        """The scale as it will be stored (rounded to the checkpoint's dtype), the gradient passed
        straight through that rounding."""
        s = self.log_scale.exp()
        return s + (s.to(self.scale_dtype).float() - s).detach()

    def _codes(self) -> torch.Tensor:
        """Integers minus zero point, [N', G, gs], rounding passed straight through."""
        sch = self.scheme
        g = _round_ste(_grouped(self.u, sch))
        if self.zero is None:
            return torch.clamp(g, sch.qmin, sch.qmax)
        z = _per_group(self.zero, g)
        return torch.clamp(g + z, sch.qmin, sch.qmax) - z

    def fake_weight(self) -> torch.Tensor:
        """The weight the integer model will have: dequantize(quantize(W))."""
        q = self._codes()
        return _ungrouped(q * _per_group(self._scale(), q), self.u.shape, self.scheme)

    @property
    def weight(self) -> torch.Tensor:
        return self.fake_weight().detach()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.fake_weight()
        return F.linear(x, w.to(x.dtype), None if self.bias is None else self.bias.to(x.dtype))

    def to_quant(self) -> QuantLinear:
        """The integer layer: the trained weights rounded onto the trained grid."""
        with torch.no_grad():
            sch = self.scheme
            q = self._codes()
            if self.zero is not None:
                q = q + _per_group(self.zero, q)
            q = _ungrouped(q, self.u.shape, sch).to(torch.int8)
            s = self.log_scale.detach().exp().to(self.scale_dtype)
            qw = QuantizedWeight(q, s, None if self.zero is None else self.zero.clone(), sch, {**self.info, "qat": True})
        return QuantLinear(qw, self.bias)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, {self.scheme.describe()}, "
                f"learn_weights={self.learn_weights}, learn_scales={self.learn_scales}")


def add_qat(model: nn.Module, learn_scales: bool = False, learn_weights: bool = True) -> list[str]:
    """Replace every QuantLinear of ``model`` with a :class:`QATLinear`; freeze everything else.
    ``learn_weights=False, learn_scales=True`` trains the scales alone, the integers fixed (as
    EfficientQAT's end-to-end phase, Chen et al. 2024). Returns the replaced module names."""
    from llmpress.models import set_submodule

    for p in model.parameters():
        p.requires_grad_(False)
    names = [n for n, m in model.named_modules() if isinstance(m, QuantLinear)]
    if not names:
        raise ValueError("the model has no quantized linears (QuantLinear) to train: compress it with an "
                         "integer weight-only recipe (rtn / gptq / awq, e.g. w3a16-gptq) first")
    for n in names:
        set_submodule(model, n, QATLinear(model.get_submodule(n), learn_scales, learn_weights))
    log.info("QAT on %d quantized linears (weights %s, scales %s)", len(names), learn_weights, learn_scales)
    return names


def qat_modules(model: nn.Module) -> dict[str, QATLinear]:
    return {n: m for n, m in model.named_modules() if isinstance(m, QATLinear)}


def export_qat(model: nn.Module) -> dict:
    """Put integer QuantLinear layers back (the trained weights rounded onto the trained grid).
    Returns what training changed: the share of integers that moved from the starting model's
    and the mean relative change of the scales."""
    from llmpress.models import set_submodule

    mods = qat_modules(model)
    if not mods:
        raise ValueError("the model has no QAT layers (add_qat first)")
    moved = total = 0
    ds = num = 0.0
    for n, m in mods.items():
        ql = m.to_quant()
        moved += int((ql.qdata != m.start_q).sum())
        total += ql.qdata.numel()
        ds += float(((ql.scale.float() - m.start_scale).abs() / m.start_scale.abs().clamp(min=1e-12)).sum())
        num += m.start_scale.numel()
        set_submodule(model, n, ql)
    return {"layers": len(mods), "integers_moved": moved / max(total, 1), "scale_change": ds / max(num, 1)}
