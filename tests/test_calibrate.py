import pytest
import torch

import llmpress as lp
from llmpress.calibrate import plan
from llmpress.recipe import RecipeError

from conftest import correlated_tokens, tiny_model


def _logit_err(model, ref, tokens):
    with torch.no_grad():
        return ((model(tokens).logits - ref) ** 2).mean().item()


def test_gptq_pass_beats_rtn_on_model_outputs():
    base = tiny_model("llama", seed=1)
    calib = correlated_tokens(32, 64, seed=1)
    held = correlated_tokens(4, 64, seed=2)
    with torch.no_grad():
        ref = base(held).logits
    errs = {}
    for r in ("w3a16-rtn", "w3a16-gptq"):
        m = tiny_model("llama", seed=1)
        lp.compress(m, lp.recipe(r, group_size=32), calib, progress=False)
        errs[r] = _logit_err(m, ref, held)
    assert errs["w3a16-gptq"] < 0.75 * errs["w3a16-rtn"], errs


def test_rtn_needs_no_calibration_and_skips_pass():
    m = tiny_model("qwen2")
    rep = lp.compress(m, lp.recipe("w8a16"), None, progress=False)
    assert rep.calib_tokens == 0 and len(rep.layers) == 14


def test_overrides_mixed_schemes_and_lm_head(tmp_path):
    m = tiny_model("llama")
    r = lp.Recipe.from_dict({"steps": [
        {"method": "gptq", "bits": 4, "group_size": 32, "ignore": [],
         "overrides": [{"pattern": "re:.*mlp\\.down_proj", "bits": 8, "group_size": -1},
                       {"pattern": "lm_head", "method": "rtn", "bits": 8, "group_size": -1},
                       {"pattern": "re:model\\.layers\\.0\\.self_attn", "skip": True}]},
    ]})
    rep = lp.compress(m, r, correlated_tokens(4, 32), progress=False)
    schemes = {d["name"]: d["scheme"] for d in rep.layers}
    assert schemes["model.layers.1.mlp.down_proj"] == "int8 per-channel sym"
    assert schemes["model.layers.1.mlp.up_proj"] == "int4 g32 sym"
    assert schemes["lm_head"] == "int8 per-channel sym"
    assert "model.layers.0.self_attn.q_proj" not in schemes
    lp.save(m, tmp_path / "mixed")
    back = lp.load(tmp_path / "mixed")
    t = correlated_tokens(2, 16)
    with torch.no_grad():
        assert torch.equal(back(t).logits, m(t).logits)


def test_plan_errors_before_any_change():
    m = tiny_model("llama")
    before = {k: v.clone() for k, v in m.state_dict().items()}
    with pytest.raises(ValueError, match="group_size=48 must divide in_features=64"):
        lp.compress(m, lp.recipe("w4a16-rtn", group_size=48), None, progress=False)
    with pytest.raises(RecipeError, match="outside the decoder blocks"):
        plan(m, lp.Recipe.from_dict({"steps": [{"method": "gptq", "group_size": 32, "ignore": []}]}))
    with pytest.raises(RecipeError, match="targeted by steps"):
        plan(m, lp.Recipe.from_dict({"steps": [{"method": "rtn", "group_size": 32}, {"method": "rtn", "group_size": 32}]}))
    with torch.no_grad():
        m.model.layers[1].mlp.up_proj.weight[3, 3] = float("nan")
    with pytest.raises(ValueError, match="model.layers.1.mlp.up_proj.*NaN"):
        lp.compress(m, lp.recipe("w4a16-gptq", group_size=32), correlated_tokens(2, 16), progress=False)
    for k, v in m.state_dict().items():  # nothing was swapped or modified
        if k != "model.layers.1.mlp.up_proj.weight":
            assert torch.equal(v, before[k]), k
