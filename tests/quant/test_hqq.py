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
    for float_zero in (True, False):
        q = hqq(w, sc, HQQConfig(int_zero=not float_zero))
        assert q.qdata.min() >= sc.qmin and q.qdata.max() <= sc.qmax
        err = (q.dequantize() - w).abs().mean()
        assert err < (0.99 if bits < 8 else 1.0) * base, (bits, float_zero, float(err), float(base))
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
    rep = lp.compress(m, lp.recipe("w3a16-hqq", group_size=32, float_zero=float_zero), None, progress=False)
    assert rep.calib_tokens == 0 and {d["method"] for d in rep.layers} == {"hqq"}
    lp.save(m, tmp_path / "h")
    back = lp.load(tmp_path / "h")
    t = correlated_tokens(2, 16)
    with torch.no_grad():
        assert torch.equal(back(t).logits, m(t).logits)
