import pytest
import torch

import llmpress as lp
from llmpress.quant.act import ActScheme, fake_quant, static_scale
from llmpress.quant.primitives import (
    FP8,
    QuantScheme,
    compute_qparams,
    dequantize,
    quantize,
)
from llmpress.quant.smoothquant import smooth_scale
from llmpress.recipe import RecipeError


def test_int8_per_token_is_on_the_grid_and_close():
    x = torch.randn(4, 7, 64)
    a = ActScheme()
    y = fake_quant(x, a)
    s = x.abs().amax(-1, keepdim=True) / 127.5
    q = y / s
    assert torch.allclose(q, q.round(), atol=1e-3) and q.min() >= -128 - 1e-3 and q.max() <= 127 + 1e-3
    assert ((y - x).abs() <= s / 2 * 1.001).all()


def test_fp8_activation_and_static_scales():
    x = torch.randn(8, 32) * 5
    y = fake_quant(x, ActScheme(type="float"))
    assert ((y - x).abs() / x.abs().clamp(min=1e-3)).median() < 0.07
    st = ActScheme(strategy="tensor", dynamic=False)
    with pytest.raises(ValueError, match="calibrated input scale"):
        fake_quant(x, st)
    y = fake_quant(x, st, static_scale(x.abs().max(), st))
    assert (y - x).abs().max() <= x.abs().max() / 255 + 1e-6


def test_bad_activation_configs():
    with pytest.raises(ValueError, match="act_bits"):
        ActScheme(bits=4)
    with pytest.raises(ValueError, match="per tensor"):
        ActScheme(dynamic=False)
    with pytest.raises(RecipeError, match="needs act_bits"):
        lp.recipe("w8a16", smoothquant=0.5)
    with pytest.raises(RecipeError, match="migration strength"):
        lp.recipe("w8a8-int8", smoothquant=1.5)
    with pytest.raises(RecipeError, match="8-bit and symmetric"):
        lp.recipe("w8a8-fp8", bits=4)


def test_fp8_weights():
    w = torch.randn(32, 64)
    sc = QuantScheme(8, True, "channel", None, "float")
    s, z = compute_qparams(w, sc)
    q = quantize(w, s, z, sc)
    assert q.dtype == FP8 and z is None
    rel = ((dequantize(q, s, z, sc) - w).abs() / w.abs().clamp(min=1e-2)).median()
    assert rel < 0.04, rel


def test_smoothquant_moves_outliers_into_weights():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1024, 64, generator=g)
    x[:, :3] *= 60  # activation outlier channels, as in LLMs past a few hundred million params
    w = torch.randn(48, 64, generator=g) * 0.05
    sc = QuantScheme(8, True, "channel")

    def wq(w):
        s, z = compute_qparams(w, sc)
        return dequantize(quantize(w, s, z, sc), s, z, sc)

    s, alpha, info = smooth_scale([w], x.abs().amax(0), "auto", x, [wq], ActScheme())
    assert alpha > 0 and info["smooth_err_ratio"] < 0.5, info
    s5, a5, _ = smooth_scale([w], x.abs().amax(0), 0.5, None, [wq], ActScheme())
    assert a5 == 0.5 and torch.allclose(s5, (x.abs().amax(0) / w.abs().amax(0)).sqrt(), rtol=1e-4)
