"""Pruning solvers: masks have the promised structure, and each method beats the simpler one
on the error it is designed to reduce (a degenerate method would fail these)."""

import pytest
import torch

from llmpress.prune.masks import SparsityPattern, magnitude, select, wanda
from llmpress.prune.sparsegpt import SparseGPTConfig, sparsegpt
from llmpress.quant.gptq import GPTQConfig, gptq
from llmpress.quant.primitives import QuantScheme
from llmpress.quant.rtn import rtn


def _inputs(n=2048, k=128, outliers=(3, 17, 90), seed=0):
    """Correlated inputs with a few outlier channels, like a real LM's hidden states."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 16, generator=g) @ torch.randn(16, k, generator=g) * 0.5 + torch.randn(n, k, generator=g)
    x[:, list(outliers)] *= 20.0
    return x


def _err(w, w2, x):
    return float(((w - w2) @ x.T).pow(2).sum() / (w @ x.T).pow(2).sum())


def _w(n=64, k=128, seed=1):
    return torch.randn(n, k, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("pattern", ["2:4", "4:8", "1:4"])
@pytest.mark.parametrize("method", ["magnitude", "wanda", "sparsegpt"])
def test_nm_masks_keep_exactly_n_of_every_m(method, pattern):
    w, x = _w(), _inputs()
    pat = SparsityPattern.parse(pattern, 0.5)
    h = 2 * x.T @ x / x.shape[0]
    out = {"magnitude": lambda: magnitude(w, pat), "wanda": lambda: wanda(w, x.pow(2).mean(0), pat),
           "sparsegpt": lambda: sparsegpt(w, h, pat)}[method]()
    nz = (out.weight != 0).reshape(w.shape[0], -1, pat.m).sum(-1)
    assert (nz == pat.n).all()
    assert torch.equal(out.mask, out.weight != 0)


@pytest.mark.parametrize("sparsity", [0.3, 0.5, 0.7])
def test_unstructured_sparsity_is_exact(sparsity):
    w, x = _w(), _inputs()
    pat = SparsityPattern(sparsity)
    assert abs((magnitude(w, pat).weight == 0).float().mean() - sparsity) < 1e-3
    wd = wanda(w, x.pow(2).mean(0), pat).weight
    assert ((wd == 0).sum(1) == int(128 * sparsity)).all()  # Wanda: per output row
    sg = sparsegpt(w, 2 * x.T @ x / x.shape[0], pat).weight
    assert abs((sg == 0).float().mean() - sparsity) < 0.01


def test_wanda_uses_activations_and_beats_magnitude_on_outlier_inputs():
    w, x = _w(), _inputs()
    pat = SparsityPattern(0.5)
    mg, wd = magnitude(w, pat), wanda(w, x.pow(2).mean(0), pat)
    assert not torch.equal(mg.mask, wd.mask)
    assert wd.mask[:, [3, 17, 90]].float().mean() > 0.95  # weights reading outlier channels are kept
    assert _err(w, wd.weight, x) < 0.5 * _err(w, mg.weight, x)


@pytest.mark.parametrize("pattern", ["unstructured", "2:4"])
def test_sparsegpt_beats_wanda_by_reconstruction(pattern):
    w, x = _w(), _inputs()
    pat = SparsityPattern.parse(pattern, 0.5)
    wd = wanda(w, x.pow(2).mean(0), pat)
    sg = sparsegpt(w, 2 * x.T @ x / x.shape[0], pat)
    assert _err(w, sg.weight, x) < 0.8 * _err(w, wd.weight, x)


def test_sparsegpt_joint_quantization_is_sparse_and_on_grid():
    w, x = _w(), _inputs()
    h = 2 * x.T @ x / x.shape[0]
    pat = SparsityPattern.parse("2:4", 0.5)
    scheme = QuantScheme(4, False, "group", 32)
    qw = sparsegpt(w, h, pat, scheme=scheme)
    deq = qw.dequantize()
    nz = (deq != 0).reshape(64, -1, 4).sum(-1)
    assert (nz <= 2).all() and (deq == 0).float().mean() >= 0.5
    # better than pruning with SparseGPT and then rounding the kept weights plainly
    pruned = sparsegpt(w, h, pat)
    plain = rtn(pruned.weight, scheme).dequantize() * pruned.mask
    assert _err(w, deq, x) < _err(w, plain, x)


def test_gptq_keeps_a_given_mask_and_beats_rounding():
    w, x = _w(), _inputs()
    h = 2 * x.T @ x / x.shape[0]
    pruned = sparsegpt(w, h, SparsityPattern.parse("2:4", 0.5))
    scheme = QuantScheme(4, False, "group", 32)
    qw = gptq(pruned.weight, h, scheme, GPTQConfig(act_order=True), mask=pruned.mask)
    deq = qw.dequantize()
    assert torch.equal(deq != 0, pruned.mask & (deq != 0)) and (deq[~pruned.mask] == 0).all()
    plain = rtn(pruned.weight, scheme).dequantize() * pruned.mask
    assert _err(w, deq, x) < 0.8 * _err(w, plain, x)


def test_select_ties_and_zero_sparsity():
    s = torch.ones(4, 8)
    assert select(s, SparsityPattern(0.0), per_row=True).all()
    assert (select(s, SparsityPattern(0.25), per_row=False).sum() == 24)


@pytest.mark.parametrize("pattern,sparsity,msg", [
    ("unstructured", 1.0, "sparsity"), ("unstructured", -0.1, "sparsity"), ("4:2", 0.5, "N < M"),
    ("2-4", 0.5, "N:M"), ("0:4", 0.5, "N < M")])
def test_bad_patterns(pattern, sparsity, msg):
    with pytest.raises(ValueError, match=msg):
        SparsityPattern.parse(pattern, sparsity)


def test_shapes_that_do_not_divide_and_bad_hessian():
    pat = SparsityPattern.parse("2:4", 0.5)
    with pytest.raises(ValueError, match="multiple of M=4"):
        magnitude(torch.randn(4, 10), pat)
    with pytest.raises(ValueError, match="Hessian shape"):
        sparsegpt(torch.randn(4, 8), torch.eye(4), pat)
    with pytest.raises(ValueError, match="NaN"):
        sparsegpt(torch.randn(4, 8), torch.full((8, 8), float("nan")), pat)
    with pytest.raises(ValueError, match="block_size"):
        sparsegpt(torch.randn(4, 12), torch.eye(12), SparsityPattern.parse("2:3", 0.5), SparseGPTConfig(block_size=128))


def test_singular_hessian_is_dampened():
    w = _w(8, 16)
    x = torch.randn(4, 16)  # rank 4 < 16: singular
    out = sparsegpt(w, 2 * x.T @ x / 4, SparsityPattern(0.5), SparseGPTConfig(damp=0.0))
    assert torch.isfinite(out.weight).all() and out.info["damp"] >= 0
