"""Low-rank factorization: activation-aware SVD must beat plain SVD on the layer's output,
ranks respect the parameter budget, and LowRankLinear models save and reload exactly."""

import pytest
import torch

import llmpress as lp
from llmpress.lowrank.svd import asvd, rank_for, svd
from llmpress.nn import LowRankLinear
from llmpress.recipe import RecipeError
from tests.conftest import correlated_tokens, tiny_model


def _x(n=2048, k=96, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 12, generator=g) @ torch.randn(12, k, generator=g) + 0.3 * torch.randn(n, k, generator=g)
    x[:, :4] *= 15
    return x


@pytest.mark.parametrize("shape", [(64, 96), (160, 96)])
def test_asvd_beats_svd_on_outputs_and_svd_is_optimal_on_weights(shape):
    g = torch.Generator().manual_seed(1)
    w, x = torch.randn(*shape, generator=g), _x(k=shape[1])
    h = 2 * x.T @ x / x.shape[0]
    r = rank_for(w.shape, 0.5)
    a, s = asvd(w, h, r), svd(w, r)
    out = lambda lw: float(((w - lw.dequantize()) @ x.T).pow(2).sum())  # noqa: E731
    assert out(a) < 0.5 * out(s)
    assert (w - s.dequantize()).norm() <= (w - a.dequantize()).norm() + 1e-4
    ref = torch.linalg.svd(w).S[r:].pow(2).sum().sqrt()  # Eckart-Young
    assert torch.allclose((w - s.dequantize()).norm(), ref, rtol=1e-4)


@pytest.mark.parametrize("ratio", [0.1, 0.5, 0.8, 0.99])
def test_rank_respects_the_budget(ratio):
    for n, k in [(576, 576), (576, 1536), (1536, 576), (7, 3)]:
        r = rank_for((n, k), ratio)
        assert r >= 1 and (r * (n + k) <= ratio * n * k or r == 1)


def test_bad_ranks_ratios_and_singular_statistics():
    w = torch.randn(8, 16)
    with pytest.raises(ValueError, match="ratio"):
        rank_for(w.shape, 1.0)
    with pytest.raises(ValueError, match="rank=9"):
        svd(w, 9)
    with pytest.raises(ValueError, match="Hessian shape"):
        asvd(w, torch.eye(8), 2)
    x = torch.randn(3, 16)  # rank-3 statistics: dampening makes the whitening invertible
    out = asvd(w, x.T @ x, 4, damp=0.0)
    assert torch.isfinite(out.dequantize()).all()
    with pytest.raises(RecipeError, match="ratio"):
        lp.Recipe.from_dict({"steps": [{"method": "asvd", "ratio": 1.2}]})
    with pytest.raises(RecipeError, match="not pruning"):
        lp.compress(tiny_model(), lp.Recipe.from_dict({"steps": [{"method": "svd"}, {"method": "wanda"}]}),
                    correlated_tokens(2, 16), progress=False)
    with pytest.raises(RecipeError, match="rank 25 factor"):  # rank 25 is not a multiple of group 16
        lp.compress(tiny_model(), lp.Recipe.from_dict({"steps": [{"method": "svd"}, {"method": "rtn", "bits": 4,
                                                                                     "group_size": 16}]}), progress=False)


def test_low_rank_model_saves_reloads_and_is_smaller(tmp_path):
    base = tiny_model()
    ids = correlated_tokens(4, 64, seed=1)
    errs = {}
    for r in ("svd80", "asvd80"):
        m = tiny_model()
        lp.compress(m, r, correlated_tokens(16, 64), progress=False)
        assert sum(isinstance(x, LowRankLinear) for x in m.modules()) == 14
        with torch.no_grad():
            errs[r] = float((m(ids).logits - base(ids).logits).pow(2).mean())
        lp.save(m, tmp_path / r)
        back = lp.load(tmp_path / r)
        with torch.no_grad():
            assert torch.equal(back(ids).logits, m(ids).logits)
        n_lin = sum(x.up.weight.numel() + x.down.weight.numel() for x in m.modules() if isinstance(x, LowRankLinear))
        dense = sum(x.weight.numel() for n, x in base.named_modules() if ".layers." in n and isinstance(x, torch.nn.Linear))
        assert n_lin <= 0.8 * dense
    assert errs["asvd80"] < 0.5 * errs["svd80"], errs


def test_asvd_then_int8_composes_and_reloads(tmp_path):
    from llmpress.nn import QuantLinear

    base = tiny_model()
    ids = correlated_tokens(4, 64, seed=1)
    errs = {}
    for name, steps in {"asvd": [{"method": "asvd", "ratio": 0.8}],
                        "asvd+gptq8": [{"method": "asvd", "ratio": 0.8},
                                       {"method": "gptq", "bits": 8, "group_size": -1}]}.items():
        m = tiny_model()
        lp.compress(m, lp.Recipe.from_dict({"steps": steps}), correlated_tokens(16, 64), progress=False)
        with torch.no_grad():
            errs[name] = float((m(ids).logits - base(ids).logits).pow(2).mean())
        if name == "asvd+gptq8":
            lr = [x for x in m.modules() if isinstance(x, LowRankLinear)]
            assert len(lr) == 14 and all(isinstance(x.up, QuantLinear) and isinstance(x.down, QuantLinear) for x in lr)
            lp.save(m, tmp_path / "o")
            back = lp.load(tmp_path / "o")
            with torch.no_grad():
                assert torch.equal(back(ids).logits, m(ids).logits)
    assert errs["asvd+gptq8"] < 1.2 * errs["asvd"], errs  # int8 on the factors costs little
