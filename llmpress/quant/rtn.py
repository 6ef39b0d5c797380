"""Round-to-nearest (RTN): min-max qparams per group, then round. No calibration needed."""

from __future__ import annotations

import torch

from llmpress.quant.primitives import (
    QuantizedWeight,
    QuantScheme,
    compute_qparams,
    quantize,
)


def rtn(w: torch.Tensor, scheme: QuantScheme, observer: str = "minmax",
        hessian: torch.Tensor | None = None) -> QuantizedWeight:
    """Quantize ``w`` [out, in] to ``scheme`` by rounding; ``observer='mse'`` searches a
    clipping ratio per group first: on the weight error alone, or, given the input second
    moment ``hessian`` [in, in], on the layer's output error (AWQ's clipping search)."""
    scheme.check_shape(w.shape)
    scale, zero = compute_qparams(w, scheme, observer, hessian=hessian)
    q = quantize(w, scale, zero, scheme)
    return QuantizedWeight(q, scale.to(w.dtype), zero, scheme)
