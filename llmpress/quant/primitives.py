"""Affine integer quantization grids and the typed compressed-weight object.

Convention (the same as compressed-tensors, so writers need no conversion): integers are
signed, ``q in [-2**(b-1), 2**(b-1) - 1]``; the zero point lives in the same signed range;
``w ~= (q - zero) * scale``. Symmetric schemes have ``zero = 0`` and store none.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

STRATEGIES = ("tensor", "channel", "group")
OBSERVERS = ("minmax", "mse")
TYPES = ("int", "float")  # float: FP8 E4M3 (torch.float8_e4m3fn), symmetric, scale = amax / 448
FP8 = torch.float8_e4m3fn
FP8_MAX = float(torch.finfo(FP8).max)  # 448


@dataclass(frozen=True)
class QuantScheme:
    """How one weight matrix is quantized: bit width, symmetry, and scale granularity.

    ``strategy`` is ``"tensor"`` (one scale), ``"channel"`` (one per output row) or
    ``"group"`` (one per ``group_size`` consecutive input columns of each row). ``type`` is
    ``"int"`` (affine integers) or ``"float"`` (FP8 E4M3: 8 bits, symmetric). ``group_axis``
    1 groups along the input dimension (what compressed-tensors, GPTQ and the kernels use); 0
    groups ``group_size`` consecutive output rows of each input column (HQQ's ``axis=0``; scales
    are then [in, out / group_size]; llmpress checkpoints only).
    """

    bits: int = 4
    symmetric: bool = True
    strategy: str = "group"
    group_size: int | None = 128
    type: str = "int"
    group_axis: int = 1

    def __post_init__(self) -> None:
        if self.group_axis not in (0, 1) or isinstance(self.group_axis, bool):
            raise ValueError(f"group_axis={self.group_axis!r} is not allowed; allowed: 1 (input dim) or 0 (output dim)")
        if self.group_axis == 0 and (self.strategy != "group" or self.type != "int"):
            raise ValueError("group_axis 0 applies to integer weights with strategy 'group'")
        if self.type not in TYPES:
            raise ValueError(f"type={self.type!r} is not supported; allowed: {TYPES}")
        if self.type == "float" and (self.bits != 8 or not self.symmetric):
            raise ValueError(f"float (FP8 E4M3) weights are 8-bit and symmetric; got bits={self.bits}, "
                             f"symmetric={self.symmetric}")
        if not isinstance(self.bits, int) or not 2 <= self.bits <= 8:
            raise ValueError(f"bits={self.bits!r} is not supported; allowed: integers 2..8")
        if self.strategy not in STRATEGIES:
            raise ValueError(f"strategy={self.strategy!r} is not one of {STRATEGIES}")
        if self.strategy == "group":
            if not isinstance(self.group_size, int) or self.group_size <= 0:
                raise ValueError(
                    f"group_size={self.group_size!r} must be a positive integer for strategy "
                    "'group' (use strategy 'channel' or group_size -1 for one scale per row)"
                )
        elif self.group_size not in (None, -1):
            object.__setattr__(self, "group_size", None)

    @property
    def qmin(self) -> int:
        return -(1 << (self.bits - 1))

    @property
    def qmax(self) -> int:
        return (1 << (self.bits - 1)) - 1

    def n_groups(self, in_features: int) -> int:
        return in_features // self.group_size if self.strategy == "group" else 1

    def check_shape(self, shape: tuple[int, int] | torch.Size, name: str = "weight") -> None:
        """Raise a ValueError naming the layer when the scheme cannot tile ``shape``."""
        if len(shape) != 2:
            raise ValueError(f"{name}: expected a 2-D weight, got shape {tuple(shape)}")
        k = int(shape[1 if self.group_axis == 1 else 0])
        dim = "in_features" if self.group_axis == 1 else "out_features"
        if self.strategy == "group" and k % self.group_size != 0:
            hint = largest_pow2_divisor(k)
            raise ValueError(
                f"group_size={self.group_size} must divide {dim}={k} of {name}; "
                f"use a divisor (e.g. {hint}), group_size -1 (per channel), or a per-layer override"
            )

    def describe(self) -> str:
        g = {"tensor": "per-tensor", "channel": "per-channel"}.get(self.strategy, f"g{self.group_size}")
        g += "-out" if self.group_axis == 0 else ""
        if self.type == "float":
            return f"fp8-e4m3 {g}"
        return f"int{self.bits} {g} {'sym' if self.symmetric else 'asym'}"

    @property
    def qdtype(self) -> torch.dtype:
        """dtype of the stored grid values: int8, or float8_e4m3fn for float schemes."""
        return FP8 if self.type == "float" else torch.int8

    def round(self, x: torch.Tensor) -> torch.Tensor:
        """Nearest grid point of ``x`` (already divided by the scale, zero point added), as float."""
        if self.type == "float":
            return x.clamp(-FP8_MAX, FP8_MAX).to(FP8).float()
        return torch.round(x).clamp_(self.qmin, self.qmax)


def largest_pow2_divisor(k: int, cap: int = 128) -> int:
    g = cap
    while g > 1 and k % g:
        g //= 2
    return g


def _grouped(w: torch.Tensor, scheme: QuantScheme) -> torch.Tensor:
    """View ``w`` [N, K] as [N, G, K/G] (G groups per row) for the scheme's granularity; with
    ``group_axis`` 0 as [K, N/gs, gs] (groups of output rows per input column)."""
    n, k = w.shape
    if scheme.group_axis == 0:
        return w.t().contiguous().reshape(k, n // scheme.group_size, scheme.group_size)
    if scheme.strategy == "group":
        return w.reshape(n, k // scheme.group_size, scheme.group_size)  # [N, K] -> [N, G, gs]
    if scheme.strategy == "channel":
        return w.reshape(n, 1, k)  # [N, K] -> [N, 1, K]
    return w.reshape(1, 1, n * k)  # [N, K] -> [1, 1, N*K]


def _ungrouped(g: torch.Tensor, shape: torch.Size | tuple[int, int], scheme: QuantScheme) -> torch.Tensor:
    """The inverse of :func:`_grouped`: back to [N, K] (contiguous)."""
    if scheme.group_axis == 0:
        return g.reshape(shape[1], shape[0]).t().contiguous()
    return g.reshape(shape)


def compute_qparams(
    w: torch.Tensor,
    scheme: QuantScheme,
    observer: str = "minmax",
    importance: torch.Tensor | None = None,
    grid: int = 40,
    min_ratio: float = 0.5,
    hessian: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Scale (and zero point) for ``w`` [N, K].

    Returns ``scale`` shaped [N, G] ([1] for per-tensor) in fp32, and ``zero`` (int8, same
    shape) or None when symmetric. ``minmax``: the range of each group, symmetric using
    ``max|w| / ((qmax - qmin) / 2)`` as compressed-tensors and the GPTQ reference do.
    ``mse``: shrink the range by the factor in [min_ratio, 1] that minimises each group's
    squared rounding error, weighted per input column by ``importance`` [K] (e.g. diag(H)),
    the GPTQ reference's ``mse`` grid search. With ``hessian`` [K, K] (the input second moment)
    the error is each group's share of the layer's output error, ``e^T H_gg e``: AWQ's
    activation-aware clipping search, computed from the statistic instead of stored inputs.
    """
    if observer not in OBSERVERS:
        raise ValueError(f"observer={observer!r}; allowed: {OBSERVERS}")
    g = _grouped(w.float(), scheme)  # [N', G, gs]
    if scheme.type == "float":  # FP8 keeps relative precision: the full range is the best scale
        amax = g.abs().amax(dim=-1)
        return _flatten_tensor_params((amax / FP8_MAX).clamp(min=torch.finfo(torch.float32).tiny), None, scheme)
    lo0 = g.amin(dim=-1).clamp(max=0.0)
    hi0 = g.amax(dim=-1).clamp(min=0.0)
    if observer == "minmax":
        return _flatten_tensor_params(*_minmax(lo0, hi0, scheme), scheme)
    imp = hb = None
    if hessian is not None and scheme.group_axis == 0:
        raise ValueError("activation-aware clipping (hessian) needs groups along the input dimension (group_axis 1)")
    if hessian is not None and scheme.strategy != "tensor":
        k, gs = w.shape[1], g.shape[-1]
        hb = torch.stack([hessian[i : i + gs, i : i + gs] for i in range(0, k, gs)]).float()  # [G, gs, gs]
    elif importance is not None:
        imp = _grouped(importance.float().reshape(1, -1).expand(w.shape[0], -1).contiguous(), scheme)
    best = None
    for r in torch.linspace(1.0, min_ratio, grid).tolist():
        scale, zero = _minmax(lo0 * r, hi0 * r, scheme)
        zf = zero.float().unsqueeze(-1) if zero is not None else 0.0
        q = scheme.round(g / scale.unsqueeze(-1) + zf)
        e = (q - zf) * scale.unsqueeze(-1) - g
        if hb is not None:
            err = torch.einsum("ngi,gij,ngj->ng", e, hb, e)  # [N', G]
        else:
            err = (e * e if imp is None else e * e * imp).sum(-1)  # [N', G]
        if best is None:
            best, best_err = (scale, zero), err
        else:
            better = err < best_err
            best_err = torch.where(better, err, best_err)
            best = (torch.where(better, scale, best[0]),
                    None if zero is None else torch.where(better, zero, best[1]))
    return _flatten_tensor_params(*best, scheme)


def _flatten_tensor_params(
    scale: torch.Tensor, zero: torch.Tensor | None, scheme: QuantScheme
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Per-tensor params are stored as shape [1]; others stay [N, G]."""
    if scheme.strategy == "tensor":
        return scale.reshape(1), None if zero is None else zero.reshape(1)
    return scale, zero


def _minmax(lo: torch.Tensor, hi: torch.Tensor, scheme: QuantScheme) -> tuple[torch.Tensor, torch.Tensor | None]:
    tiny = torch.finfo(torch.float32).tiny
    if scheme.symmetric:
        amax = torch.maximum(-lo, hi)
        return (amax / ((scheme.qmax - scheme.qmin) / 2)).clamp(min=tiny), None
    scale = ((hi - lo) / (scheme.qmax - scheme.qmin)).clamp(min=tiny)
    zero = (scheme.qmin - torch.round(lo / scale)).clamp(scheme.qmin, scheme.qmax).to(torch.int8)
    return scale, zero


def _per_group(p: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """Params [N, G] (or [1]) shaped to broadcast over the grouped view ``g`` [N', G, gs]."""
    return p.float().reshape(g.shape[0], g.shape[1], 1)


def quantize(
    w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None, scheme: QuantScheme
) -> torch.Tensor:
    """Round ``w`` [N, K] onto the grid; returns int8 integers in [qmin, qmax] (FP8 values in
    ``torch.float8_e4m3fn`` for float schemes)."""
    g = _grouped(w.float(), scheme)  # [N', G, gs]
    q = g / _per_group(scale, g)
    if scheme.type == "float":
        return q.clamp_(-FP8_MAX, FP8_MAX).to(FP8).reshape(w.shape)
    q = torch.round(q)
    if zero is not None:
        q += _per_group(zero, g)
    return _ungrouped(q.clamp_(scheme.qmin, scheme.qmax).to(torch.int8), w.shape, scheme)


def dequantize(
    q: torch.Tensor,
    scale: torch.Tensor,
    zero: torch.Tensor | None,
    scheme: QuantScheme,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """``(q - zero) * scale`` broadcast over groups, as [N, K] in ``dtype``."""
    g = _grouped(q.to(torch.float32), scheme)  # [N', G, gs], a fresh tensor: safe to modify
    if zero is not None:
        g -= _per_group(zero, g)
    g *= _per_group(scale, g)
    return _ungrouped(g, q.shape, scheme).to(dtype)


@dataclass
class QuantizedWeight:
    """A weight matrix on an integer grid: the one object solvers return and writers read.

    qdata: int8 [out, in] signed integers; scale: [out, G] (or [1]; [in, out / gs] with
    ``scheme.group_axis`` 0) in the model dtype;
    zero: int8 like ``scale``, a float zero point (HQQ without integer rounding), or None
    (symmetric).
    """

    qdata: torch.Tensor
    scale: torch.Tensor
    zero: torch.Tensor | None
    scheme: QuantScheme
    info: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        assert self.qdata.dtype == self.scheme.qdtype, self.qdata.dtype
        assert self.qdata.dim() == 2
        assert (self.zero is None) == self.scheme.symmetric
        assert self.zero is None or self.zero.dtype == torch.int8 or self.zero.is_floating_point()

    @property
    def shape(self) -> torch.Size:
        return self.qdata.shape

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return dequantize(self.qdata, self.scale, self.zero, self.scheme, dtype)

    def storage_bits(self) -> int:
        """Bits this weight takes when packed (integers, scales, zero points)."""
        n, k = self.shape
        bits = math.ceil(k * self.scheme.bits / 32) * 32 * n
        bits += self.scale.numel() * self.scale.element_size() * 8
        if self.zero is not None:  # integer zero points pack like the weights; float ones (HQQ) do not
            bits += self.zero.numel() * (self.scheme.bits if self.zero.dtype == torch.int8 else self.zero.element_size() * 8)
        return bits

    def bits_per_weight(self) -> float:
        return self.storage_bits() / self.qdata.numel()

    def to(self, device: torch.device | str) -> QuantizedWeight:
        return QuantizedWeight(
            self.qdata.to(device),
            self.scale.to(device),
            None if self.zero is None else self.zero.to(device),
            self.scheme,
            self.info,
        )
