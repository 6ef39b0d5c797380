"""Sensitivity, budgeted allocation and the plan recipe on tiny seeded models."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
import yaml

import llmpress as lp
from llmpress import calibrate
from llmpress.models import linear_weight
from llmpress.plan import BudgetError, Sensitivity, allocate, measure, uniform
from llmpress.plan.sensitivity import _solve
from llmpress.recipe import Recipe
from conftest import correlated_tokens, tiny_model

GPTQ = lp.recipe("w4a16-gptq").steps[0]
RTN = lp.recipe("w4a16-rtn").steps[0]


@pytest.fixture(scope="module")
def setup():
    model = tiny_model("llama")
    tokens = correlated_tokens(8, 64)
    sens = measure(model, tokens, GPTQ, bits=(2, 3, 4, 8), group_sizes=(16, 32, -1), progress=False)
    return model, tokens, sens


def _kl(model, base, tokens):
    with torch.no_grad():
        p = F.log_softmax(base(input_ids=tokens).logits.float(), -1)
        q = F.log_softmax(model(input_ids=tokens).logits.float(), -1)
    return float((p.exp() * (p - q)).sum(-1).mean())


def _unit_alone(model, unit, tokens, bits: int, group_size: int):
    """A copy of ``model`` with only ``unit``'s layers GPTQ-compressed at (bits, group_size),
    from the Hessian of the unit's input on the base model (as the sensitivity pass sees it)."""
    m = copy.deepcopy(model)
    step = GPTQ.__class__(**{**GPTQ.to_dict(), "bits": bits, "group_size": group_size, "strategy": None,
                             "targets": ("Linear",), "ignore": ("lm_head",), "overrides": ()})
    x_h = {}
    h = m.get_submodule(unit.names[0]).register_forward_hook(
        lambda mm, a, o: x_h.update(x=a[0].detach().reshape(-1, a[0].shape[-1])))
    with torch.no_grad():
        m(input_ids=tokens)
    h.remove()
    H = 2 * x_h["x"].T @ x_h["x"] / x_h["x"].shape[0]
    for n in unit.names:
        w = linear_weight(m.get_submodule(n))
        with torch.no_grad():
            w.copy_(_solve(w.detach().clone(), H, step, n).dequantize(torch.float32))
    return m


def test_units_group_layers_that_share_an_input(setup):
    _, _, sens = setup
    leaves = [tuple(n.rsplit(".", 1)[-1] for n in u.names) for u in sens.units]
    assert leaves[:4] == [("q_proj", "k_proj", "v_proj"), ("o_proj",), ("gate_proj", "up_proj"), ("down_proj",)]
    assert len(sens.units) == 8 and sens.tokens == 8 * 64
    for u in sens.units:  # more bits never predicted worse, and cost more storage
        by = {(o.bits, o.group_size): o for o in u.options}
        for g in (16, 32, -1):
            assert by[(2, g)].kl > by[(3, g)].kl > by[(4, g)].kl > by[(8, g)].kl >= 0
            assert by[(2, g)].nbytes < by[(3, g)].nbytes < by[(4, g)].nbytes < by[(8, g)].nbytes


def test_predicted_kl_tracks_the_measured_kl_of_each_unit_alone(setup):
    """The K-FAC estimate against the real KL of quantizing one unit alone (2-bit, per channel):
    same order of magnitude per unit and the same ranking of units."""
    model, tokens, sens = setup
    pred, meas = [], []
    for u in sens.units:
        opt = next(o for o in u.options if (o.bits, o.group_size) == (2, -1))
        m = _unit_alone(model, u, tokens, 2, -1)
        pred.append(opt.kl)
        meas.append(_kl(m, model, tokens))
    pred, meas = torch.tensor(pred), torch.tensor(meas)
    ratio = pred / meas
    assert ratio.min() > 0.25 and ratio.max() < 4, ratio
    rank = lambda t: t.argsort().argsort().float()  # noqa: E731
    rp, rm = rank(pred), rank(meas)
    spearman = 1 - 6 * ((rp - rm) ** 2).sum() / (len(rp) * (len(rp) ** 2 - 1))
    assert spearman > 0.7, (pred, meas)


def test_allocation_meets_the_budget_and_beats_uniform_at_equal_size(setup):
    model, tokens, sens = setup
    for target in (3.0, 3.5, 5.0):
        p = allocate(sens, target_bits=target)
        assert p.avg_bits <= target + 1e-9
        # exact knapsack (option sizes share a divisor here): no single-unit upgrade fits in the slack left
        slack = target * sum(u.params for u in sens.units) / 8 - p.planned_bytes
        for i, u in enumerate(sens.units):
            cur = p.option(i)
            for o in u.options:
                if o.nbytes - cur.nbytes <= slack:
                    assert o.kl >= cur.kl - 1e-12
    # uniform 2-bit g16 has 4.0 bits/weight here (fp32 scales): the plan at that budget predicts less
    uni = uniform(sens, 2, 16)
    plan = allocate(sens, target_bits=uni.avg_bits)
    assert plan.kl < uni.kl and plan.planned_bytes <= uni.planned_bytes
    # ... and measures less, compressed for real through the recipe it writes
    results = {}
    for name, pl in (("plan", plan), ("uniform", uni)):
        m = copy.deepcopy(model)
        lp.compress(m, Recipe.from_dict(yaml.safe_load(pl.to_yaml())), tokens, progress=False)
        results[name] = _kl(m, model, tokens)
    assert results["plan"] < 0.8 * results["uniform"], results


def test_plan_recipe_resolves_to_the_planned_setting_of_every_layer(setup):
    model, _, sens = setup
    p = allocate(sens, target_bits=3.7)
    text = p.to_yaml("my-plan")
    assert text.startswith("# planned by `llmpress plan`") and "predicted KL" in text
    r = Recipe.from_dict(yaml.safe_load(text))
    assert r.name == "my-plan"
    resolved = calibrate.plan(model, r)
    rows = p.layers()
    assert len(rows) == 14 and len({(x["bits"], x["group_size"]) for x in rows}) > 1
    for row in rows:
        st = resolved[row["name"]][0]
        assert (st.bits, st.group_size, st.method, st.observer) == (row["bits"], row["group_size"], "gptq", "mse")
    units = {}
    for row in rows:  # layers of one unit share the setting
        units.setdefault(row["unit_kl"], set()).add((row["bits"], row["group_size"]))
    assert all(len(v) == 1 for v in units.values())


def test_max_kl_gives_the_smallest_plan_under_the_bound(setup):
    _, _, sens = setup
    loose = allocate(sens, max_kl=1.0)
    assert loose.planned_bytes == sum(min(o.nbytes for o in u.options) for u in sens.units)  # the smallest
    mid = allocate(sens, target_bits=4.5)
    p = allocate(sens, max_kl=mid.kl)
    assert p.kl <= mid.kl + 1e-12 and p.planned_bytes <= mid.planned_bytes * 1.01


def test_budget_errors_are_clear(setup):
    _, _, sens = setup
    with pytest.raises(BudgetError, match="below the smallest candidate allocation"):
        allocate(sens, target_bits=1.0)
    with pytest.raises(BudgetError, match="everything else in the checkpoint"):
        allocate(sens, target_size_mb=0.001)
    with pytest.raises(BudgetError, match="below the least predicted KL"):
        allocate(sens, max_kl=0.0)
    with pytest.raises(ValueError, match="exactly one"):
        allocate(sens, target_bits=3, max_kl=1)


def test_target_size_counts_the_whole_checkpoint(setup, tmp_path):
    model, tokens, sens = setup
    p = allocate(sens, target_size_mb=0.17)
    assert p.size_mb <= 0.17
    m = copy.deepcopy(model)
    lp.compress(m, Recipe.from_dict(yaml.safe_load(p.to_yaml())), tokens, progress=False)
    lp.save(m, tmp_path / "out")
    on_disk = sum(f.stat().st_size for f in (tmp_path / "out").glob("*.safetensors")) / 1e6
    assert on_disk == pytest.approx(p.size_mb, rel=0.02)


def test_sensitivity_round_trips_and_bad_files_are_refused(setup, tmp_path):
    _, _, sens = setup
    sens.save(tmp_path / "s.json")
    back = Sensitivity.load(tmp_path / "s.json")
    assert back.to_dict() == sens.to_dict()
    assert allocate(back, target_bits=3.5).choice == allocate(sens, target_bits=3.5).choice
    (tmp_path / "bad.json").write_text("{}")
    with pytest.raises(ValueError, match="not a sensitivity file"):
        Sensitivity.load(tmp_path / "bad.json")


def test_fused_and_conv1d_architectures(tokenizer):
    """GPT-2's fused c_attn (Conv1D) and Phi-3's fused qkv / gate_up are single units."""
    for arch, first in (("gpt2", ("attn.c_attn",)), ("phi3", ("self_attn.qkv_proj",))):
        m = tiny_model(arch)
        s = measure(m, correlated_tokens(2, 32), RTN, bits=(3, 4), group_sizes=(32,), progress=False)
        assert first in [tuple(n.split(".", 3)[-1] for n in u.names) for u in s.units]
        assert all(len(u.names) == 1 for u in s.units)  # fused layers: nothing else reads their input
        r = Recipe.from_dict(yaml.safe_load(allocate(s, target_bits=4.2).to_yaml()))
        calibrate.plan(m, r)


def test_bad_input(setup):
    model, tokens, _ = setup
    with pytest.raises(lp.RecipeError, match="weight-only"):
        measure(model, tokens, lp.recipe("w8a8-int8").steps[0], progress=False)
    with pytest.raises(lp.RecipeError, match="divides"):
        measure(model, tokens, RTN, bits=(4,), group_sizes=(48,), progress=False)
    m = tiny_model("llama")
    with torch.no_grad():
        m.model.layers[1].mlp.up_proj.weight[0, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        measure(m, tokens, RTN, progress=False)


def test_held_out_scoring(setup):
    """Solving on other samples than the ones the error is scored on: GPTQ's error looks
    smaller on the data it fitted, so the held-out estimate is larger on the whole."""
    model, tokens, sens = setup
    other = correlated_tokens(8, 64, seed=1)
    held = measure(model, tokens, GPTQ, bits=(2, 3, 4, 8), group_sizes=(16, 32, -1), progress=False, fit_tokens=other)
    assert [u.names for u in held.units] == [u.names for u in sens.units]
    same = sum(o.kl for u in sens.units for o in u.options if o.bits <= 3)
    out = sum(o.kl for u in held.units for o in u.options if o.bits <= 3)
    assert out > same
    for a, b in zip(held.units, sens.units, strict=True):  # the storage does not depend on the data
        assert [o.nbytes for o in a.options] == [o.nbytes for o in b.options]


def test_plan_cli(tmp_path, tiny_dir, text_file, capsys, monkeypatch):
    from llmpress.cli import main

    out, sf = tmp_path / "plan.yaml", tmp_path / "s.json"
    common = ["--calib", str(text_file), "--n-samples", "4", "--seqlen", "32", "--bits", "2,3,4",
              "--group-sizes", "16,32", "--sensitivity", str(sf)]
    assert main(["plan", str(tiny_dir), "--target-bits", "3.5", "-o", str(out), *common, "--json",
                 str(tmp_path / "p.json")]) == 0
    printed = capsys.readouterr().out
    assert "bits/weight over 14 layers" in printed and "predicted KL" in printed
    r = Recipe.from_dict(yaml.safe_load(out.read_text()))
    assert r.name == "plan-3.5bpw" and sf.exists()
    summary = __import__("json").loads((tmp_path / "p.json").read_text())["summary"]
    assert summary["avg_bits"] <= 3.5
    # measured costs: the saved sensitivity says how many tokens they were measured on
    sd = tmp_path / "sd.json"
    assert main(["plan", str(tiny_dir), "--target-bits", "3.5", "-o", str(tmp_path / "pd.yaml"), *common[:-1], str(sd),
                 "--direct-samples", "2"]) == 0
    direct = Sensitivity.load(sd)
    assert direct.meta["direct_tokens"] == 2 * 32
    assert all(o.kl_kfac is not None for u in direct.units for o in u.options)  # every candidate here is <= 4 bits

    def boom(*a, **k):
        raise AssertionError("the sensitivity file should have been reused")

    monkeypatch.setattr(lp, "load", boom)  # re-planning reads the saved sensitivity only
    assert main(["plan", str(tiny_dir), "--target-size", "0.2MB", "-o", str(out), "--overwrite", *common]) == 0
    assert main(["plan", str(tiny_dir), "--max-kl", "0.01", "-o", str(out), "--overwrite", *common]) == 0
    assert main(["plan", str(tiny_dir), "--target-bits", "3.5", "-o", str(out), *common]) == 2
    assert "exists" in capsys.readouterr().err
    assert main(["plan", str(tiny_dir), "--target-bits", "1", "-o", str(tmp_path / "x.yaml"), *common]) == 2
    assert "below the smallest candidate allocation" in capsys.readouterr().err
    assert not (tmp_path / "x.yaml").exists()


def test_direct_measurement_is_the_real_kl_of_each_unit_alone(setup):
    """With direct samples, each low-bit candidate's cost is the KL of the whole model's output
    with that unit alone compressed (checked here through a full forward of a copy), the K-FAC
    estimate is kept beside it, and 8-bit candidates keep the estimate."""
    model, tokens, _ = setup
    before = {k: v.clone() for k, v in model.state_dict().items()}
    sens = measure(model, tokens, GPTQ, bits=(2, 8), group_sizes=(32, -1), progress=False, direct_tokens=tokens[:3])
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())  # the model is left as it was
    assert sens.meta["direct_tokens"] == 3 * 64
    for u in sens.units[:4]:
        opt = next(o for o in u.options if (o.bits, o.group_size) == (2, 32))
        assert opt.kl_kfac is not None and opt.kl > 0
        eight = next(o for o in u.options if o.bits == 8)
        assert eight.kl_kfac is None
        m = _unit_alone(model, u, tokens, 2, 32)
        assert opt.kl == pytest.approx(_kl(m, model, tokens[:3]), rel=1e-3)


def test_asymmetric_candidates_are_measured_merged_and_written(setup):
    """``asym_bits`` adds a symmetric step's zero-point form as a candidate; costs measured
    later on the same tokens merge in; a plan mixing both writes ``symmetric: false``
    overrides that resolve to exactly the planned layers."""
    import dataclasses

    from llmpress.plan.allocate import Plan

    model, tokens, sens = setup
    with_asym = measure(model, tokens, GPTQ, bits=(2, 8), group_sizes=(-1,), progress=False, asym_bits=(2,))
    for u in with_asym.units:
        keys = sorted((o.bits, o.sym(True)) for o in u.options)
        assert keys == [(2, False), (2, True), (8, True)]
        two = {o.sym(True): o for o in u.options if o.bits == 2}
        assert two[False].nbytes > two[True].nbytes  # the zero points are stored
    later = measure(model, tokens, dataclasses.replace(GPTQ, symmetric=False), bits=(2,), group_sizes=(-1,), progress=False)
    both = sens.merge(later)
    assert both.symmetric and [len(b.options) - len(a.options) for a, b in zip(sens.units, both.units)] == [1] * 8
    assert both.units[0].options[-1].kl == later.units[0].options[0].kl
    assert len(sens.units[0].options) == 12  # merge leaves its inputs alone
    with pytest.raises(ValueError, match="same tokens"):
        sens.merge(measure(model, tokens[:4], GPTQ, bits=(2,), group_sizes=(-1,), progress=False))
    # unit 0 and 3 asymmetric 2-bit, the rest symmetric 3-bit per channel
    pick = []
    for i, u in enumerate(both.units):
        want = (2, -1, False) if i in (0, 3) else (3, -1, True)
        pick.append(next(j for j, o in enumerate(u.options) if (o.bits, o.group_size, o.sym(True)) == want))
    p = Plan(both, pick, "mixed")
    text = p.to_yaml("mixed")
    assert "symmetric: false" in text and "=2/-1a" in text
    resolved = calibrate.plan(model, Recipe.from_dict(yaml.safe_load(text)))
    rows = p.layers()
    assert {r["symmetric"] for r in rows} == {True, False}
    for row in rows:
        st = resolved[row["name"]][0]
        assert (st.bits, st.group_size, st.symmetric) == (row["bits"], row["group_size"], row["symmetric"])
    assert uniform(both, 2, -1, symmetric=False).target == "uniform w2 g-1 asym"
