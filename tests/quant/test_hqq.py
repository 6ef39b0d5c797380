import pytest
import torch
from conftest import correlated_tokens, tiny_model

import llmpress as lp
from llmpress.quant.hqq import HQQConfig, hqq
from llmpress.quant.primitives import QuantScheme
from llmpress.quant.rtn import rtn
from llmpress.recipe import RecipeError


def _heavy_tailed(n=256, k=256, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, k, generator=g) * 0.02 * (1 + 3 * torch.rand(n, k, generator=g) ** 8)


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_hqq_beats_rounding(bits):
    w = _heavy_tailed()
    sc = QuantScheme(bits, False, "group", 64)
    base = (rtn(w, sc).dequantize() - w).abs().mean()
    for float_zero, early_stop in ((True, True), (False, True), (True, False)):
        q = hqq(w, sc, HQQConfig(int_zero=not float_zero, early_stop=early_stop))
        assert q.qdata.min() >= sc.qmin and q.qdata.max() <= sc.qmax
        err = (q.dequantize() - w).abs().mean()
        assert err < (0.99 if bits < 8 else 1.0) * base, (bits, float_zero, early_stop, float(err), float(base))
    assert hqq(w, sc, HQQConfig(int_zero=False)).zero.is_floating_point()
    assert hqq(w, sc).zero.dtype == torch.int8


def test_hqq_rejects_symmetric_and_bad_config():
    with pytest.raises(ValueError, match="symmetric: false"):
        hqq(torch.randn(8, 64), QuantScheme(4, True, "group", 32))
    with pytest.raises(ValueError, match="lp_norm"):
        HQQConfig(lp_norm=1.5)
    with pytest.raises(RecipeError, match="symmetric: false"):
        lp.recipe("w4a16-hqq", symmetric=True)
    with pytest.raises(RecipeError, match="float_zero applies"):
        lp.recipe("w4a16-rtn", float_zero=True)


@pytest.mark.parametrize("float_zero", [False, True])
def test_hqq_model_round_trip(tmp_path, float_zero):
    m = tiny_model("qwen2")
    rep = lp.compress(m, lp.recipe("w3a16-hqq", group_size=32, float_zero=float_zero, group_axis=1), None,
                      progress=False)
    assert rep.calib_tokens == 0 and {d["method"] for d in rep.layers} == {"hqq"}
    lp.save(m, tmp_path / "h")
    back = lp.load(tmp_path / "h")
    t = correlated_tokens(2, 16)
    with torch.no_grad():
        assert torch.equal(back(t).logits, m(t).logits)


@pytest.mark.parametrize("method", ["rtn", "hqq"])
def test_output_axis_groups_are_the_transposed_problem(method):
    """group_axis 0 (HQQ's axis=0) quantizes groups of output rows: exactly the input-axis
    problem of W^T, with scales [in, out / gs]."""
    w = _heavy_tailed(192, 128)
    s0, s1 = QuantScheme(3, False, "group", 64, group_axis=0), QuantScheme(3, False, "group", 64)
    solve = hqq if method == "hqq" else rtn
    q0, q1 = solve(w, s0), solve(w.t().contiguous(), s1)
    assert q0.scale.shape == (128, 3) and q0.qdata.shape == w.shape
    assert torch.equal(q0.qdata, q1.qdata.t()) and torch.equal(q0.dequantize(), q1.dequantize().t())
    assert "g64-out" in s0.describe()


def test_output_axis_errors():
    with pytest.raises(ValueError, match="out_features=96"):
        hqq(torch.randn(96, 128), QuantScheme(4, False, "group", 64, group_axis=0))
    with pytest.raises(ValueError, match="group_axis"):
        QuantScheme(4, False, "group", 64, group_axis=2)
    with pytest.raises(RecipeError, match="group_axis 0"):
        lp.recipe("w4a16-gptq", group_axis=0)
    with pytest.raises(RecipeError, match="group_axis 0"):
        lp.recipe("w4a16-awq", group_axis=0)
    with pytest.raises(ValueError, match="group_axis 1"):
        from llmpress.quant.gptq import gptq
        gptq(torch.randn(64, 64), torch.eye(64), QuantScheme(4, False, "group", 32, group_axis=0))


@pytest.mark.parametrize("float_zero", [False, True])
def test_output_axis_model_round_trip(tmp_path, float_zero):
    import json

    m = tiny_model("qwen2")
    lp.compress(m, lp.recipe("w3a16-hqq", group_size=32, float_zero=float_zero, group_axis=0), None, progress=False)
    q = m.model.layers[0].self_attn.k_proj
    assert q.scale.shape == (64, 1) and q.scheme.group_axis == 0
    lp.save(m, tmp_path / "h")
    cfg = json.loads((tmp_path / "h" / "config.json").read_text())["quantization_config"]
    assert {g["format"] for g in cfg["config_groups"].values()} == {"llmpress-quantized"}
    back = lp.load(tmp_path / "h")
    t = correlated_tokens(2, 16)
    with torch.no_grad():
        assert torch.equal(back(t).logits, m(t).logits)


def test_range_shrink_fits_two_bit_weights_better():
    """range_shrink lets each group start from a clipped range (at 2 bits min-max wastes levels
    on outliers): the fitted weights are clearly closer, and the recipe checks its values."""
    w = _heavy_tailed(128, 256, seed=3)
    sc = QuantScheme(2, False, "group", 64)
    plain = (hqq(w, sc, HQQConfig(int_zero=False)).dequantize() - w).abs().mean()
    shrunk = (hqq(w, sc, HQQConfig(int_zero=False, shrink=(1.0, 0.8))).dequantize() - w).abs().mean()
    assert shrunk < 0.97 * plain, (float(shrunk), float(plain))
    assert torch.equal(hqq(w, sc, HQQConfig(shrink=(1.0,))).dequantize(), hqq(w, sc).dequantize())
    assert lp.recipe("w2a16-hqq").steps[0].range_shrink == (1.0, 0.8)
    with pytest.raises(RecipeError, match="range_shrink"):
        lp.recipe("w4a16-hqq", range_shrink=[1.0, 1.5])
    with pytest.raises(RecipeError, match="applies to method 'hqq' only"):
        lp.recipe("w4a16-gptq", range_shrink=[1.0, 0.8])

