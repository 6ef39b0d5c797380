import json

import pytest
import torch
from conftest import correlated_tokens, tiny_model

import llmpress as lp
from llmpress.nn import CodebookLinear
from llmpress.quant.nf4 import code, dynamic_code, quantize_4bit
from llmpress.recipe import RecipeError


def test_code_books():
    nf4, fp4, dyn = code("nf4"), code("fp4"), dynamic_code()
    assert nf4.shape == (16,) and torch.all(nf4[1:] > nf4[:-1]) and nf4[0] == -1 and nf4[7] == 0 and nf4[-1] == 1
    assert sorted((fp4 * 12).abs().tolist())[::2] == [0, 0.0625, 2, 3, 4, 6, 8, 12]
    assert dyn.shape == (256,) and torch.all(dyn[1:] >= dyn[:-1]) and dyn[-1] == 1 and (dyn == 0).sum() == 1


@pytest.mark.parametrize("qt", ["nf4", "fp4"])
def test_codes_are_nearest_and_double_quant_is_close(qt):
    g = torch.Generator().manual_seed(0)
    w = torch.randn(48, 96, generator=g) * (1 + 4 * torch.rand(48, 96, generator=g) ** 6)
    plain = quantize_4bit(w, qt, 64, double_quant=False)
    cb = code(qt)
    x = (w.reshape(-1, 64) / plain.absmax.unsqueeze(1)).reshape(-1)
    d = (x.unsqueeze(1) - cb).abs()
    chosen = d.gather(1, plain.codes.reshape(-1, 1).long()).squeeze(1)
    assert torch.allclose(chosen, d.min(1).values, atol=1e-7)  # always a nearest code value
    rel = (plain.dequantize() - w).norm() / w.norm()
    assert rel < (0.12 if qt == "nf4" else 0.2), rel
    dq = quantize_4bit(w, qt, 64, double_quant=True)
    assert torch.equal(dq.codes, plain.codes) and dq.absmax.dtype == torch.uint8
    assert ((dq.absmax_fp32() - plain.absmax).abs() / plain.absmax).max() < 0.02
    assert dq.bits_per_weight() < plain.bits_per_weight() < 4.6


def test_nf4_beats_int4_absmax_on_gaussian_weights():
    w = torch.randn(256, 256, generator=torch.Generator().manual_seed(1))
    from llmpress.quant.primitives import QuantScheme
    from llmpress.quant.rtn import rtn

    nf4 = (quantize_4bit(w, "nf4", 64, False).dequantize() - w).pow(2).mean()
    int4 = (rtn(w, QuantScheme(4, True, "group", 64)).dequantize() - w).pow(2).mean()
    assert nf4 < 0.9 * int4


def test_bad_inputs():
    with pytest.raises(ValueError, match="blocksize=48"):
        quantize_4bit(torch.randn(4, 96), "nf4", 48)
    with pytest.raises(ValueError, match="quant_type"):
        quantize_4bit(torch.randn(4, 64), "nf3", 64)
    with pytest.raises(RecipeError, match="does not combine with act_bits"):
        lp.recipe("nf4", act_bits=8)
    with pytest.raises(RecipeError, match="bits must be 4"):
        lp.recipe("nf4", bits=3)


@pytest.mark.parametrize("preset", ["nf4", "fp4"])
def test_model_saves_in_bitsandbytes_layout_and_reads_back_exactly(tmp_path, preset):
    m = tiny_model("llama")
    rep = lp.compress(m, lp.recipe(preset), None, progress=False)
    assert rep.layers[0]["scheme"] == f"{preset} b64 dq"
    assert sum(isinstance(x, CodebookLinear) for x in m.modules()) == 14
    out = lp.save(m, tmp_path / "q")
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    assert qc["quant_method"] == "bitsandbytes" and qc["bnb_4bit_quant_type"] == preset
    assert qc["bnb_4bit_use_double_quant"] is True and qc["llm_int8_skip_modules"] == ["lm_head"]
    back = lp.load(out)
    t = correlated_tokens(2, 16)
    with torch.no_grad():
        assert torch.equal(back(t).logits, m(t).logits)


def test_mixed_codebook_and_integer_layers_cannot_be_saved(tmp_path):
    m = tiny_model("llama")
    r = lp.Recipe.from_dict([{"method": "nf4", "bits": 4, "group_size": 64,
                              "overrides": [{"pattern": "re:.*down_proj", "method": "rtn", "group_size": 32}]}])
    lp.compress(m, r, None, progress=False)
    with pytest.raises(ValueError, match="mixes NF4/FP4 layers"):
        lp.save(m, tmp_path / "x")
    assert not (tmp_path / "x").exists()
