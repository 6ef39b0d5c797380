"""Fast paths behind the compressed linears' forward, each with the pure-torch reference it is
tested against.

``LLMPRESS_KERNELS`` picks: ``auto`` (default: the Triton kernel for weight-only integer and
code-book weights on a CUDA device, the reference elsewhere), ``reference`` (always dequantize
then matmul), ``triton`` (like auto, but a layer the kernel cannot take raises instead of
falling back). A layer the kernel cannot take (FP8 values, groups along the output dimension,
groups smaller than 16, activations quantized too) runs the reference with one warning per
reason; a kernel never gives a wrong result silently.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import weakref
from collections.abc import Iterator

import torch

from llmpress.kernels.layout import PackedWeight, UnsupportedLayout, pack, reference_matmul

log = logging.getLogger(__name__)
MODES = ("auto", "reference", "triton")
_warned: set[str] = set()


_FORCED: list[str] = []


@contextlib.contextmanager
def forced(m: str) -> Iterator[None]:
    """Use mode ``m`` inside the block whatever ``LLMPRESS_KERNELS`` says. The calibration pass
    re-runs compressed blocks on the reference path: deterministic (no autotuned split-K sums),
    so a resumed run computes the same activations as an uninterrupted one."""
    if m not in MODES:
        raise ValueError(f"kernel mode {m!r}; allowed: {MODES}")
    _FORCED.append(m)
    try:
        yield
    finally:
        _FORCED.pop()


def mode() -> str:
    if _FORCED:
        return _FORCED[-1]
    m = os.environ.get("LLMPRESS_KERNELS", "auto")
    if m not in MODES:
        raise ValueError(f"LLMPRESS_KERNELS={m!r}; allowed: {MODES}")
    return m


@functools.lru_cache(maxsize=1)
def triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def _warn_once(reason: str) -> None:
    if reason not in _warned:
        _warned.add(reason)
        log.warning("llmpress kernels: %s; using the reference path (dequantize, then matmul)", reason)


def check_supported(p: PackedWeight) -> None:
    """Raise :class:`UnsupportedLayout` for a packed weight the Triton kernel cannot tile."""
    from llmpress.kernels.triton_wa16 import supported_group

    if not supported_group(p.bits, p.group_size, p.k):
        raise UnsupportedLayout(f"group size {p.group_size} with {p.bits}-bit codes: the kernel takes "
                                "multiples of 16")


def _cached(module: torch.nn.Module, key: tuple, build):
    """``build()`` once per module and key (device / dtype), kept on the module outside its state
    dict; an :class:`UnsupportedLayout` is kept too, so an unsupported layer is not re-packed
    on every call. One entry per module: moving devices or dtypes drops the old one."""
    cache = module.__dict__.setdefault("_kernel_cache", {})
    if key not in cache:
        cache.clear()
        try:
            cache[key] = build()
        except UnsupportedLayout as e:
            cache[key] = e
    return cache[key]


def packed_for(module: torch.nn.Module, device: torch.device, dtype: torch.dtype) -> PackedWeight:
    """The module's weight in the kernel layout on ``device`` with scales in ``dtype``, built on
    first use; raises :class:`UnsupportedLayout` (every call) where the kernel cannot take it."""
    def build() -> PackedWeight:
        p = pack(module.qweight.to(device), dtype)
        check_supported(p)
        return p

    p = _cached(module, (str(device), dtype), build)
    if isinstance(p, UnsupportedLayout):
        raise p
    return p


def _cpu_linear(module: torch.nn.Module, x: torch.Tensor) -> torch.Tensor | None:
    from llmpress.kernels import cpu
    from llmpress.quant.primitives import QuantizedWeight

    def build() -> cpu.CpuPacked:
        qw = module.qweight
        if not isinstance(qw, QuantizedWeight) or getattr(module, "act", None) is not None:
            raise UnsupportedLayout("not a weight-only integer layer")
        return cpu.pack_cpu(qw, x.dtype)

    p = _cached(module, ("cpu", x.dtype), build)
    return None if isinstance(p, UnsupportedLayout) else cpu.matmul(x, p, module.bias)


_OPAQUE: dict[int, weakref.ref] = {}


def make_opaque(model: torch.nn.Module) -> int:
    """Let torch.compile treat every compressed linear of ``model`` as one opaque op
    (``llmpress::compressed_linear``) instead of breaking its graph there (which also makes it
    recompile the code after the break once per block). Returns the number of layers."""
    from llmpress.nn import CompressedLinear

    n = 0
    for m in model.modules():
        if isinstance(m, CompressedLinear):
            _OPAQUE[id(m)] = weakref.ref(m)
            m._op_handle = id(m)
            n += 1
    return n


@torch.library.custom_op("llmpress::compressed_linear", mutates_args=())
def _compressed_linear(x: torch.Tensor, handle: int) -> torch.Tensor:
    return _OPAQUE[handle]().forward_eager(x)


@_compressed_linear.register_fake
def _(x: torch.Tensor, handle: int) -> torch.Tensor:
    return x.new_empty(*x.shape[:-1], _OPAQUE[handle]().out_features)


@torch.compiler.disable  # never traced (Triton autotuning, cached packs): see make_opaque
def linear(module: torch.nn.Module, x: torch.Tensor) -> torch.Tensor | None:
    """y = module(x) through a kernel, or None where the reference path must run. On the CPU,
    bf16 inputs to int4 / int8 layers go through PyTorch's CPU kernels (float32 inputs keep
    the reference: those kernels are slower than a dense float32 matmul there).

    The kernels have no derivative of their own; where the input needs a gradient (LoRA /
    QLoRA training through a frozen compressed layer) the output carries one:
    dL/dx = dL/dy · W, with W dequantized only inside the backward pass."""
    if torch.is_grad_enabled() and x.requires_grad and getattr(module, "act", None) is None:
        with torch.no_grad():
            y = _linear(module, x.detach())
        return None if y is None else _GradX.apply(x, y, module)
    return _linear(module, x)


class _GradX(torch.autograd.Function):
    """Attach the input gradient to a kernel's output (weights and bias are frozen)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, y: torch.Tensor, module: torch.nn.Module) -> torch.Tensor:  # noqa: D102
        ctx.module = module
        return y.view_as(y)

    @staticmethod
    def backward(ctx, gy: torch.Tensor):  # noqa: D102
        return gy @ dense_weight(ctx.module, gy.device, gy.dtype), None, None


def dense_weight(module: torch.nn.Module, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """The layer's [N, K] weight in ``dtype`` on ``device``: from the packed kernel layout when
    there is one (one Triton kernel), else dequantized from the codes."""
    p = module.__dict__.get("_kernel_cache", {}).get((str(device), dtype))
    if device.type == "cuda" and isinstance(p, PackedWeight):
        from llmpress.kernels.triton_wa16 import dequantize

        return dequantize(p, dtype)
    return module.qweight.to(device).dequantize(dtype)


def _linear(module: torch.nn.Module, x: torch.Tensor) -> torch.Tensor | None:
    m = mode()
    if m == "reference":
        return None
    if not x.is_cuda:
        return _cpu_linear(module, x) if x.device.type == "cpu" and x.dtype == torch.bfloat16 else None
    if getattr(module, "act", None) is not None:
        reason = "activation quantization (W8A8) has no Triton kernel here"
    elif not triton_available():
        reason = "triton is not installed"
    else:
        try:
            p = packed_for(module, x.device, x.dtype if x.dtype in (torch.float16, torch.bfloat16) else torch.float32)
        except UnsupportedLayout as e:
            reason = str(e)
        else:
            from llmpress.kernels.triton_wa16 import matmul

            return matmul(x, p, module.bias)
    if m == "triton":
        raise UnsupportedLayout(f"{type(module).__name__}: {reason} (LLMPRESS_KERNELS=triton)")
    _warn_once(reason)
    return None


def prepack(model: torch.nn.Module, dtype: torch.dtype = torch.bfloat16, offload_codes: bool = False) -> int:
    """Pack every integer-quantized linear of a CUDA-resident ``model`` into the kernel layout now
    (for activations of ``dtype``) instead of at its first forward. With ``offload_codes`` the
    one-byte-per-weight integer codes then move to the CPU: the GPU keeps only the packed codes
    (``bits`` / 8 bytes per weight) and the scales, which is what QLoRA training needs. Saving
    and CPU paths still find the codes; a forward in another dtype re-packs from them. Returns
    the number of layers packed (0 on a CPU model)."""
    from llmpress.nn import QuantLinear

    n = 0
    for m in model.modules():
        if not isinstance(m, QuantLinear) or m.scale.device.type != "cuda" or m.act is not None:
            continue
        try:
            packed_for(m, m.scale.device, dtype)
        except UnsupportedLayout:
            continue
        if offload_codes:
            m.qdata = m.qdata.cpu()
        n += 1
    if offload_codes and n:
        torch.cuda.empty_cache()
    return n


__all__ = ["PackedWeight", "UnsupportedLayout", "pack", "reference_matmul", "linear", "mode", "check_supported",
           "prepack"]
