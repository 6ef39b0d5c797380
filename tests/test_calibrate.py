import pytest
import torch
from conftest import correlated_tokens, tiny_model

import llmpress as lp
from llmpress.calibrate import plan
from llmpress.recipe import RecipeError


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


def test_awq_pass_beats_rtn_and_keeps_float_model_when_unquantized():
    base = tiny_model("llama", seed=1)
    calib = correlated_tokens(32, 64, seed=1)
    held = correlated_tokens(4, 64, seed=2)
    with torch.no_grad():
        ref = base(held).logits
    errs, reps = {}, {}
    for r in ("w3a16-rtn", "w3a16-awq", "w3a16-gptq", "w3a16-awq-gptq"):
        m = tiny_model("llama", seed=1)
        reps[r] = lp.compress(m, lp.recipe(r, group_size=32), calib, progress=False)
        errs[r] = _logit_err(m, ref, held)
    assert errs["w3a16-awq"] < 0.75 * errs["w3a16-rtn"], errs
    assert errs["w3a16-awq-gptq"] < errs["w3a16-rtn"], errs
    alphas = [d["awq_alpha"] for d in reps["w3a16-awq"].layers if "awq_alpha" in d]
    assert len(alphas) == 14 and any(a > 0 for a in alphas)  # every layer has a foldable producer
    assert {d["method"] for d in reps["w3a16-awq-gptq"].layers} == {"awq+gptq"}


def test_awq_fold_that_changes_the_float_model_is_undone(monkeypatch, caplog):
    from llmpress import fold

    monkeypatch.setitem(fold.LINEAR_PAIRS, "o_proj", "q_proj")  # not a per-channel linear path
    m = tiny_model("llama", seed=1)
    with caplog.at_level("WARNING"):
        rep = lp.compress(m, lp.recipe("w3a16-awq", group_size=32), correlated_tokens(8, 32), progress=False)
    assert "keeps plain scales" in caplog.text
    undone = {d["name"].split(".")[2] for d in rep.layers if "awq_alpha" not in d}
    assert undone and all(not d["name"].startswith(f"model.layers.{b}.") or "awq_alpha" not in d
                          for b in undone for d in rep.layers)


def test_smoothquant_w8a8_beats_plain_w8a8_on_activation_outliers():
    base = tiny_model("llama", seed=1)
    with torch.no_grad():  # outlier channels in the residual stream, as in real LLMs
        base.model.embed_tokens.weight[:, 5:7] *= 30.0
    state = {k: v.clone() for k, v in base.state_dict().items()}
    calib, held = correlated_tokens(16, 64, seed=1), correlated_tokens(4, 64, seed=2)
    with torch.no_grad():
        ref = base(held).logits
    errs, reps = {}, {}
    step = dict(method="rtn", bits=8, group_size=-1, act_bits=8)
    for name, kw in {"plain": {}, "smooth": dict(smoothquant="auto")}.items():
        m = tiny_model("llama", seed=1)
        m.load_state_dict(state)
        reps[name] = lp.compress(m, lp.Recipe.from_dict([{**step, **kw}]), calib, progress=False)
        errs[name] = _logit_err(m, ref, held)
    assert errs["smooth"] < 0.7 * errs["plain"], errs
    assert any(d.get("smooth_alpha", 0) > 0 for d in reps["smooth"].layers)


@pytest.mark.parametrize("recipe", ["w8a8-int8", "w4a16-awq"])
def test_one_trace_per_block_structure_gives_the_same_result(recipe, monkeypatch):
    """Blocks of one structure reuse the first block's trace and take the float reference from
    the statistics pass: the compressed model is identical to tracing every block."""
    import llmpress.calibrate as cal

    calib = correlated_tokens(8, 32, seed=3)
    a = tiny_model("llama", seed=4)
    calls = []
    real_trace = cal.fold.trace
    monkeypatch.setattr(cal.fold, "trace", lambda *x, **k: calls.append(1) or real_trace(*x, **k))
    lp.compress(a, lp.recipe(recipe, group_size=32), calib, progress=False)
    assert len(calls) == 1  # the tiny model's blocks share one structure
    n_blocks = len(a.model.layers)
    assert cal.structure(a.model.layers[0]) == cal.structure(a.model.layers[1])
    b = tiny_model("llama", seed=4)
    monkeypatch.setattr(cal, "structure", lambda block: object())  # never equal: trace every block
    calls.clear()
    lp.compress(b, lp.recipe(recipe, group_size=32), calib, progress=False)
    assert len(calls) == n_blocks
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k
