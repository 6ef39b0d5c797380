"""Quantization-aware training: it starts exactly at the compressed model, must recover more than
it would without training, exports integers that reproduce the trained model, saves as the
usual checkpoint, and resumes exactly."""

from __future__ import annotations

import copy

import pytest
import torch

from conftest import correlated_tokens, tiny_model
from llmpress.nn import QuantLinear
from llmpress.recover import QATLinear, RecoverConfig, add_qat, export_qat, kd_loss, recover


def _kl(teacher, student, ids) -> float:
    with torch.no_grad():
        return float(kd_loss(student(input_ids=ids).logits, teacher(input_ids=ids).logits))


def _w3(model, symmetric=False):
    from llmpress.models import block_linears, find_blocks, set_submodule
    from llmpress.quant.primitives import QuantScheme
    from llmpress.quant.rtn import rtn

    sch = QuantScheme(3, symmetric, "group", 32)
    path, blocks = find_blocks(model)
    for i, b in enumerate(blocks):
        for n, m in block_linears(b).items():
            set_submodule(model, f"{path}.{i}.{n}", QuantLinear(rtn(m.weight.data, sch), m.bias))
    return model


@pytest.mark.parametrize("learn_weights", [True, False])
def test_qat_recovers_and_exports_exact_integers(learn_weights):
    teacher = tiny_model("llama", seed=0)
    student = _w3(copy.deepcopy(teacher))
    train, held = correlated_tokens(32, 64, seed=1), correlated_tokens(8, 64, seed=2)
    ref = student(input_ids=held).logits
    before = _kl(teacher, student, held)
    names = add_qat(student, learn_scales=True, learn_weights=learn_weights)
    assert len(names) == 14 and all(isinstance(student.get_submodule(n), QATLinear) for n in names)
    torch.testing.assert_close(student(input_ids=held).logits, ref)  # starts at the quantized model
    frozen = {n: t.clone() for n, t in student.state_dict().items() if "layers" not in n or "norm" in n}
    cfg = RecoverConfig(steps=40, lr=0.03 if learn_weights else 0.003, batch_size=8, warmup=2,
                        scale_lr_ratio=0.3 if learn_weights else 3.0)  # log-scale lr 0.009 both times
    rep = recover(student, train, teacher, cfg, progress=False)
    assert rep.losses[-1] < rep.losses[0]
    for n, t in student.state_dict().items():  # embeddings, norms, head stay as they were
        if n in frozen:
            assert torch.equal(t, frozen[n]), n
    fake = student(input_ids=held).logits
    info = export_qat(student)
    assert not any(isinstance(m, QATLinear) for m in student.modules())
    qls = [m for m in student.modules() if isinstance(m, QuantLinear)]
    assert len(qls) == 14 and all(m.qdata.min() >= -4 and m.qdata.max() <= 3 for m in qls)
    torch.testing.assert_close(student(input_ids=held).logits, fake, rtol=1e-4, atol=1e-4)
    assert (info["integers_moved"] > 0.01) == learn_weights and info["scale_change"] > 0.01
    after = _kl(teacher, student, held)
    assert after < 0.6 * before, (before, after)


def test_qat_checkpoint_saves_reloads_and_resumes(tmp_path, tokenizer):
    import llmpress as lp

    teacher = tiny_model("llama", seed=0)
    tokens = correlated_tokens(16, 32, seed=3)
    cfg = RecoverConfig(steps=6, lr=2e-3, batch_size=4, save_every=2, warmup=2)

    def fresh():
        s = _w3(copy.deepcopy(teacher), symmetric=True)
        add_qat(s, learn_scales=True)
        return s

    a = fresh()
    ra = recover(a, tokens, teacher, cfg, progress=False)
    b = fresh()
    recover(b, tokens, teacher, cfg, checkpoint_dir=tmp_path / "ck", progress=False, stop_after=3)
    c = fresh()
    rc = recover(c, tokens, teacher, cfg, checkpoint_dir=tmp_path / "ck", progress=False)
    assert rc.resumed_from == 2 and rc.losses == pytest.approx(ra.losses, rel=1e-5, abs=1e-7)
    export_qat(a)
    ids = correlated_tokens(2, 24, seed=5)
    ref = a(input_ids=ids).logits
    a.llmpress_tokenizer = tokenizer
    out = lp.save(a, tmp_path / "qat", overwrite=False)
    back = lp.load(out)
    assert sum(isinstance(m, QuantLinear) for m in back.modules()) == 14
    torch.testing.assert_close(back(input_ids=ids).logits, ref, rtol=1e-4, atol=1e-4)


def test_qat_refuses_what_it_cannot_train():
    with pytest.raises(ValueError, match="no quantized linears"):
        add_qat(tiny_model("llama"))
    from llmpress.quant.primitives import QuantScheme
    from llmpress.quant.rtn import rtn

    w = torch.randn(16, 32)
    fp8 = QuantLinear(rtn(w, QuantScheme(8, True, "channel", None, "float")))
    with pytest.raises(ValueError, match="integer grids"):
        QATLinear(fp8)
    with pytest.raises(ValueError, match="nothing to train"):
        recover(tiny_model("llama"), correlated_tokens(8, 16), tiny_model("llama"), RecoverConfig(steps=1, train="qat"),
                progress=False)


def test_recover_recipe_step_trains_after_compression(tmp_path, tokenizer):
    import json

    import llmpress as lp
    from llmpress.recipe import Recipe, RecipeError

    steps = [dict(method="rtn", bits=3, group_size=32, symmetric=False),
             dict(method="recover", train="qat", steps=12, lr=0.03, batch_size=4, seqlen=32, n_samples=16)]
    r = Recipe.from_dict({"steps": steps})
    assert r.recover is not None and len(r.steps) == 1 and Recipe.from_dict(r.to_dict()) == r
    teacher = tiny_model("llama", seed=0)
    held = lp.data.eval_windows(tokenizer, "wiki", seqlen=48, n_windows=8)  # the training text's kind, never trained on
    plain = copy.deepcopy(teacher)
    lp.compress(plain, Recipe.from_dict({"steps": steps[:1]}), progress=False)
    m = copy.deepcopy(teacher)
    m.llmpress_tokenizer = tokenizer
    rep = lp.compress(m, r, progress=False)
    assert rep.recovery["steps"] == 12 and rep.recovery["qat"]["scale_change"] > 0
    assert sum(isinstance(x, QuantLinear) for x in m.modules()) == 14
    assert _kl(teacher, m, held) < _kl(teacher, plain, held)
    out = lp.save(m, tmp_path / "out")
    assert json.loads((out / "llmpress_recipe.json").read_text())["steps"][-1]["method"] == "recover"
    torch.testing.assert_close(lp.load(out)(input_ids=held).logits, m(input_ids=held).logits, rtol=1e-4, atol=1e-4)
    for bad, msg in (([steps[1], steps[0]], "last step"), ([steps[1]], "compression step"),
                     ([steps[0], {**steps[1], "train": "lora"}], "llmpress recover"),
                     ([steps[0], {**steps[1], "steps": 0}], "steps=0"),
                     ([steps[0], {**steps[1], "kd": "sideways"}], "kd="),
                     ([steps[0], {**steps[1], "epochs": 3}], "unknown field")):
        with pytest.raises(RecipeError, match=msg):
            Recipe.from_dict({"steps": bad})
