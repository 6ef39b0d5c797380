import pytest
import torch

from llmpress.quant.primitives import (
    QuantizedWeight,
    QuantScheme,
    compute_qparams,
    dequantize,
    quantize,
)
from llmpress.quant.rtn import rtn

SCHEMES = [QuantScheme(b, sym, st, 32 if st == "group" else None)
           for b in (2, 3, 4, 8) for sym in (True, False) for st in ("tensor", "channel", "group")]


@pytest.mark.parametrize("s", SCHEMES, ids=lambda s: s.describe().replace(" ", "-"))
def test_error_bound_and_range(s):
    w = torch.randn(48, 128, generator=torch.Generator().manual_seed(0))
    qw = rtn(w, s)
    assert qw.qdata.dtype == torch.int8
    assert int(qw.qdata.min()) >= s.qmin and int(qw.qdata.max()) <= s.qmax
    err = (qw.dequantize() - w).abs()
    scale = qw.scale.float()
    if s.strategy == "tensor":
        bound = scale.expand_as(w)
    else:
        bound = scale.repeat_interleave(w.shape[1] // scale.shape[1], dim=1)
    # round-to-nearest: at most half a step, except the one clipped extreme of a symmetric grid
    tol = 0.5001 if not s.symmetric else 0.5001 * (s.qmax - s.qmin) / (2 * s.qmax)
    assert (err <= bound * tol + 1e-6).all()
    # more bits, less error
    if s.bits < 8:
        w8 = rtn(w, QuantScheme(8, s.symmetric, s.strategy, s.group_size))
        assert (w8.dequantize() - w).pow(2).mean() < err.pow(2).mean()


def test_asymmetric_zero_point_grid_is_exact_for_grid_values():
    # weights already on an asymmetric 4-bit g32 grid are reproduced exactly
    g = torch.Generator().manual_seed(1)
    q = torch.randint(-8, 8, (8, 64), generator=g)
    q[:, ::32] = -8
    q[:, 1::32] = 7
    scale = torch.rand(8, 2, generator=g) + 0.1
    zero = torch.randint(-3, 3, (8, 2), generator=g)
    s = QuantScheme(4, False, "group", 32)
    w = dequantize(q.to(torch.int8), scale, zero.to(torch.int8), s)
    assert torch.allclose(rtn(w, s).dequantize(), w, atol=1e-5)


def test_group_size_must_divide():
    with pytest.raises(ValueError, match=r"group_size=128 must divide in_features=576 of layer\.x.*64"):
        QuantScheme(4, True, "group", 128).check_shape((10, 576), "layer.x")


@pytest.mark.parametrize("bad", [dict(bits=1), dict(bits=9), dict(strategy="row"), dict(group_size=0)])
def test_bad_scheme(bad):
    with pytest.raises(ValueError):
        QuantScheme(**{**dict(bits=4, symmetric=True, strategy="group", group_size=32), **bad})


def test_bits_per_weight_accounts_for_scales():
    w = torch.randn(64, 256)
    qw = rtn(w, QuantScheme(4, True, "group", 64))
    assert qw.bits_per_weight() == pytest.approx(4 + 32 / 64)
    qa = rtn(w, QuantScheme(4, False, "group", 64))
    assert qa.bits_per_weight() == pytest.approx(4 + 32 / 64 + 4 / 64)


def test_quantize_dequantize_consistency():
    w = torch.randn(16, 64)
    s = QuantScheme(3, False, "group", 16)
    scale, zero = compute_qparams(w, s)
    q = quantize(w, scale, zero, s)
    assert torch.equal(QuantizedWeight(q, scale, zero, s).dequantize(), dequantize(q, scale, zero, s))
