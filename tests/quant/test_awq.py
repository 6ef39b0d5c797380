import torch

from llmpress.quant.awq import expand_scale, output_error, reduce_absmean, search_scale
from llmpress.quant.primitives import QuantScheme, compute_qparams, dequantize, quantize


def _fq(scheme):
    def q(w):
        s, z = compute_qparams(w, scheme)
        return dequantize(quantize(w, s, z, scheme), s, z, scheme)
    return q


def _outlier_inputs(n=2048, k=128, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, k, generator=g)
    x[:, :4] *= 25.0  # a few salient channels, as in real LLM activations
    return x


def test_awq_scale_beats_plain_rounding_on_outlier_channels():
    x = _outlier_inputs()
    w = torch.randn(96, 128, generator=torch.Generator().manual_seed(1)) * 0.05
    h = 2 * x.t() @ x / x.shape[0]
    scheme = QuantScheme(3, False, "group", 32)
    s, alpha, info = search_scale([w], [h], [_fq(scheme)], x.abs().mean(0))
    assert alpha > 0
    plain = output_error(w - _fq(scheme)(w), h)
    scaled = output_error(w - _fq(scheme)(w * s) / s, h)
    assert scaled < 0.8 * plain, (float(scaled), float(plain))
    assert abs(info["awq_err_ratio"] - float(scaled / plain)) < 1e-4


def test_awq_never_worse_than_no_scaling():
    x = torch.randn(512, 64)  # isotropic: nothing to gain, alpha 0 must stay a candidate
    w = torch.randn(32, 64)
    h = 2 * x.t() @ x / 512
    s, alpha, info = search_scale([w], [h], [_fq(QuantScheme(4, True, "group", 16))], x.abs().mean(0))
    assert info["awq_err_ratio"] <= 1.0


def test_gqa_expand_and_reduce():
    s = torch.arange(1.0, 9.0)  # 2 kv heads x head_dim 4
    e = expand_scale(s, rep=3, head_dim=4)
    assert e.shape == (24,)
    assert torch.equal(e[:4], s[:4]) and torch.equal(e[4:8], s[:4]) and torch.equal(e[12:16], s[4:])
    assert torch.equal(reduce_absmean(e, 3, 4), s)


def test_activation_weighted_clipping_lowers_output_error():
    x = _outlier_inputs(seed=2)
    h = 2 * x.t() @ x / x.shape[0]
    w = torch.randn(64, 128, generator=torch.Generator().manual_seed(3))
    w[:, 5] *= 8  # an outlier weight column whose input is small: clipping it is cheap
    scheme = QuantScheme(3, False, "group", 32)
    errs = {}
    for name, kw in {"minmax": {}, "mse": dict(observer="mse"), "awq": dict(observer="mse", hessian=h)}.items():
        sc, z = compute_qparams(w, scheme, **kw)
        errs[name] = float(output_error(w - dequantize(quantize(w, sc, z, scheme), sc, z, scheme), h))
    assert errs["awq"] < errs["minmax"] and errs["awq"] <= errs["mse"], errs
