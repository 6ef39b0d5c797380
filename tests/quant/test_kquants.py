import gguf
import numpy as np
import pytest
import torch

from llmpress.quant import ggml, kquants


def _rows(seed: int = 0) -> torch.Tensor:
    """Gaussian rows of 512 plus edge super-blocks: zeros, constant, one outlier, all negative,
    all positive, tiny values."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(16, 512, generator=g) * 0.02
    w[0, :256] = 0
    w[1, :256] = 0.3
    w[2, 7] = 1.5
    w[3, :256] = -w[3, :256].abs()
    w[4, 256:] = w[4, 256:].abs()
    w[5, :256] *= 1e-6
    return w


def _deq(b: torch.Tensor, t: str, shape) -> torch.Tensor:
    return torch.from_numpy(gguf.quants.dequantize(b.numpy(), getattr(gguf.GGMLQuantizationType, t.upper()))).reshape(shape)


def _own(x: torch.Tensor, t: str, imp=None) -> torch.Tensor:
    """The values the solver chose, rebuilt from its integers (not from the bytes)."""
    spec = kquants.SPECS[t]
    xb = x.reshape(-1, 256)
    w = torch.ones_like(xb) if imp is None else imp.repeat(x.shape[0] * x.shape[1] // imp.numel()).view_as(xb)
    s = kquants._solve_chunk(xb, w, spec)
    q = s["q"].float().view(-1, 256 // spec.sub, spec.sub)
    y = s["d"].view(-1, 1, 1) * s["sc"].float().unsqueeze(-1) * q
    if spec.affine:
        y = y - s["dmin"].view(-1, 1, 1) * s["m"].float().unsqueeze(-1)
    return y.reshape(x.shape)


def _naive(x: torch.Tensor, t: str) -> torch.Tensor:
    """The simplest K-quant: each sub-block's own min / max scale, the super-block divisor from
    the largest, everything rounded once (what a first implementation does)."""
    spec = kquants.SPECS[t]
    xs = x.reshape(-1, 256 // spec.sub, spec.sub)
    if spec.affine:
        lo = xs.amin(-1).clamp(max=0)
        s = (xs.amax(-1) - lo) / spec.qmax
        d, dm = (s.amax(-1, keepdim=True) / spec.smax).half().float(), ((-lo).amax(-1, keepdim=True) / spec.smax).half().float()
        sc, m = torch.round(s / d).clamp(0, spec.smax), torch.round(-lo / dm).clamp(0, spec.smax)
        q = torch.round((xs + (dm * m).unsqueeze(-1)) / (d * sc).unsqueeze(-1)).clamp(0, spec.qmax)
        return ((d * sc).unsqueeze(-1) * q - (dm * m).unsqueeze(-1)).reshape(x.shape)
    big = xs.gather(-1, xs.abs().argmax(-1, keepdim=True)).squeeze(-1)
    s = big / spec.qmin
    bs = s.gather(-1, s.abs().argmax(-1, keepdim=True))
    d = (bs / spec.smin).half().float()
    sc = torch.round(s / d).clamp(spec.smin, spec.smax)
    q = torch.round(xs / (d * sc).unsqueeze(-1)).clamp(spec.qmin, spec.qmax)
    return ((d * sc).unsqueeze(-1) * q).reshape(x.shape)


@pytest.mark.parametrize("t", kquants.TYPES)
def test_kquant_bytes_read_back_by_gguf(t):
    """The gguf package's dequantizer (a port of ggml-quants.c) reads our bytes as exactly the
    values the solver chose, edge blocks included; the error is small and finite."""
    x = _rows()
    b = kquants.quantize_rows(x, t)
    bs, size = gguf.GGML_QUANT_SIZES[getattr(gguf.GGMLQuantizationType, t.upper())]
    assert b.dtype == torch.uint8 and b.shape == (16, 512 // bs * size)
    y = _deq(b, t, x.shape)
    torch.testing.assert_close(y, _own(x, t), rtol=0, atol=1e-7)
    assert torch.isfinite(y).all()
    assert (y[0, :256] == 0).all()  # zeros stay zeros
    rel = float(((y - x) ** 2).sum() / (x ** 2).sum())
    assert 0 < rel < {"q2_k": 0.12, "q3_k": 0.04, "q4_k": 0.01, "q5_k": 0.003, "q6_k": 0.001}[t], rel


@pytest.mark.parametrize("t", kquants.TYPES)
def test_kquant_search_beats_naive_rounding(t):
    """The scale search lowers the error of plain min/max K-quant rounding by a margin (llama.cpp's
    own quantizer is compared in bench/export.py)."""
    x = torch.randn(64, 1024, generator=torch.Generator().manual_seed(3)) * 0.02
    ours = ((_deq(kquants.quantize_rows(x, t), t, x.shape) - x) ** 2).sum()
    naive = ((_naive(x, t) - x) ** 2).sum()
    assert ours < 0.93 * naive, (t, float(ours / naive))


@pytest.mark.parametrize("t", ["q3_k", "q4_k", "q6_k"])
def test_importance_weights_lower_the_weighted_error(t):
    g = torch.Generator().manual_seed(4)
    x = torch.randn(64, 512, generator=g) * 0.02
    imp = torch.rand(512, generator=g) ** 4 * 10
    plain = _deq(kquants.quantize_rows(x, t), t, x.shape)
    weighted = _deq(kquants.quantize_rows(x, t, imp), t, x.shape)
    e = lambda y: float((imp * (y - x) ** 2).sum())  # noqa: E731
    assert e(weighted) < 0.97 * e(plain), (t, e(weighted) / e(plain))


@pytest.mark.parametrize("t", ["q4_0", "q5_0", "q8_0", "q4_1", "q5_1"])
def test_weighted_legacy_blocks_beat_reference(t):
    g = torch.Generator().manual_seed(5)
    x = torch.randn(32, 256, generator=g) * 0.02
    imp = torch.rand(256, generator=g) ** 4 * 10
    ty = getattr(gguf.GGMLQuantizationType, t.upper())
    ref = torch.from_numpy(gguf.quants.dequantize(ggml.quantize_rows(x, t).numpy(), ty)).reshape(x.shape)
    w = torch.from_numpy(gguf.quants.dequantize(kquants.quantize_legacy_weighted(x, t, imp).numpy(), ty)).reshape(x.shape)
    e = lambda y: float((imp * (y - x) ** 2).sum())  # noqa: E731
    assert e(w) < 0.98 * e(ref), (t, e(w) / e(ref))


def test_kquant_errors():
    with pytest.raises(ValueError, match="multiple of the q4_k super-block size 256"):
        kquants.quantize_rows(torch.randn(2, 576), "q4_k")
    with pytest.raises(ValueError, match="not a K-quant type"):
        kquants.quantize_rows(torch.randn(2, 256), "q4_0")
    with pytest.raises(ValueError, match="512 entries for rows of 256"):
        kquants.quantize_rows(torch.randn(2, 256), "q4_k", torch.ones(512))
    with pytest.raises(ValueError, match="non-finite"):
        kquants.quantize_rows(torch.randn(2, 256), "q4_k", torch.full((256,), float("nan")))


def test_carry_keeps_solved_integers():
    """A 4-bit asymmetric grid with one scale per 32 columns fits Q5_0 (q - zero in [-15, 15]),
    Q4_1 and Q8_0 exactly (up to fp16 scales); symmetric 4-bit fits Q4_0; group 16 fits nothing."""
    from llmpress.quant.primitives import QuantScheme
    from llmpress.quant.rtn import rtn

    w = torch.randn(8, 128, generator=torch.Generator().manual_seed(6)) * 0.05
    asym = rtn(w, QuantScheme(bits=4, symmetric=False, group_size=32))
    sym = rtn(w, QuantScheme(bits=4, symmetric=True, group_size=64))
    for qw, t in ((asym, "q5_0"), (asym, "q4_1"), (asym, "q8_0"), (sym, "q4_0"), (sym, "q5_1")):
        b = ggml.carry(qw, t)
        assert b is not None, t
        y = torch.from_numpy(gguf.quants.dequantize(b.numpy(), getattr(gguf.GGMLQuantizationType, t.upper()))).reshape(w.shape)
        torch.testing.assert_close(y, qw.dequantize(), rtol=2e-3, atol=2e-3 * float(w.abs().max()))  # fp16 scales
    assert ggml.carry(asym, "q4_0") is None  # q - zero spans 31 values: not a 16-level symmetric grid
    assert ggml.carry(rtn(w, QuantScheme(bits=4, symmetric=False, group_size=16)), "q5_0") is None
    assert ggml.carry(rtn(w, QuantScheme(bits=8, symmetric=True, group_size=32)), "q4_0") is None
