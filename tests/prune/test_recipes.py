"""Pruning through recipes and the calibration pass on tiny models: composition with
quantization, bad recipes, and compact sparse checkpoints read back exactly."""

import json

import pytest
import torch

import llmpress as lp
from llmpress.nn import QuantLinear
from llmpress.recipe import RecipeError
from tests.conftest import correlated_tokens, tiny_model


def _linears(m):
    return {n: x for n, x in m.named_modules() if ".layers." in n and isinstance(x, (torch.nn.Linear, QuantLinear))}


def _out_err(m, base, ids):
    with torch.no_grad():
        return float((m(ids).logits - base(ids).logits).pow(2).mean())


def test_wanda_and_sparsegpt_beat_magnitude_on_a_model():
    base = tiny_model()
    calib, ids = correlated_tokens(16, 64), correlated_tokens(4, 64, seed=1)
    err = {}
    for r in ("sparse50-magnitude", "sparse50-wanda", "sparse50-sparsegpt"):
        m = tiny_model()
        rep = lp.compress(m, r, calib, progress=False)
        assert all(abs(layer["sparsity"] - 0.5) < 0.01 for layer in rep.layers)
        assert "lm_head" not in [layer["name"] for layer in rep.layers]
        err[r] = _out_err(m, base, ids)
    assert err["sparse50-wanda"] < err["sparse50-magnitude"], err
    assert err["sparse50-sparsegpt"] < err["sparse50-wanda"], err


@pytest.mark.parametrize("joint", [False, True])
def test_sparse_then_gptq_keeps_the_mask_and_reloads_exactly(tmp_path, joint):
    m = tiny_model()
    r = lp.Recipe.from_dict({"steps": [{"method": "sparsegpt", "pattern": "2:4", "joint": joint},
                                       {"method": "gptq", "bits": 4, "group_size": 32, "act_order": not joint}]})
    rep = lp.compress(m, r, correlated_tokens(8, 64), progress=False)
    for n, q in _linears(m).items():
        assert isinstance(q, QuantLinear)
        nz = (q.weight != 0).reshape(q.out_features, -1, 4).sum(-1)
        assert (nz <= 2).all(), n
    assert all(abs(x["sparsity"] - 0.5) < 0.02 for x in rep.layers)
    lp.save(m, tmp_path / "o")
    back = lp.load(tmp_path / "o")
    ids = correlated_tokens(2, 32, seed=3)
    with torch.no_grad():
        assert torch.equal(back(ids).logits, m(ids).logits)


def test_sparse_checkpoint_is_compact_and_exact(tmp_path):
    m = tiny_model()
    lp.save(m, tmp_path / "dense")
    lp.compress(m, "sparse50-magnitude", progress=False)
    lp.save(m, tmp_path / "sparse")
    size = {k: (tmp_path / k / "model.safetensors").stat().st_size for k in ("dense", "sparse")}
    lin = sum(x.weight.numel() * 4 for x in _linears(m).values())
    # the pruned linears shrink from 32 to ~17 bits per weight; everything else is unchanged
    assert size["dense"] - size["sparse"] > 0.4 * lin, size
    cfg = json.loads((tmp_path / "sparse" / "config.json").read_text())["quantization_config"]
    assert cfg["sparsity_config"]["format"] == "sparse-bitmask"
    assert cfg["sparsity_config"]["sparsity_structure"] == "unstructured"
    back = lp.load(tmp_path / "sparse")
    for (n, a), (_, b) in zip(_linears(m).items(), _linears(back).items()):
        assert torch.equal(a.weight, b.weight), n


def test_bitmask_roundtrip_odd_shapes():
    from llmpress.formats import sparse

    g = torch.Generator().manual_seed(0)
    for shape in [(3, 13), (5, 8), (1, 1), (7, 33)]:
        w = torch.randn(*shape, generator=g) * (torch.rand(*shape, generator=g) > 0.6)
        t = sparse.compress("x.weight", w)
        assert torch.equal(sparse.decompress("x.weight", dict(t)), w)
    assert sparse.structure([torch.tensor([[1.0, 0, 0, 2, 0, 0, 3, 4]])]) == "2:4"
    assert sparse.structure([torch.tensor([[1.0, 1, 1, 0, 0, 0, 0, 0]])]) == "unstructured"


@pytest.mark.parametrize("steps,msg", [
    ([{"method": "rtn", "bits": 4, "group_size": 32}, {"method": "wanda"}], "put the pruning step first"),
    ([{"method": "wanda"}, {"method": "magnitude"}], "at most one pruning step"),
    ([{"method": "wanda", "sparsity": 1.5}], "sparsity"),
    ([{"method": "wanda", "pattern": "4:2"}], "N < M"),
    ([{"method": "sparsegpt", "joint": True}], "joint sparsegpt needs a following plain 'gptq'"),
    ([{"method": "wanda", "joint": True}], "joint"),
    ([{"method": "wanda", "pattern": "2:4", "bits": 4}], "unknown field"),
    ([{"method": "sparsegpt", "pattern": "2:3"}], "not a multiple of M=3"),
])
def test_bad_prune_recipes(steps, msg):
    with pytest.raises(RecipeError, match=msg):
        lp.compress(tiny_model(), lp.Recipe.from_dict({"steps": steps}), correlated_tokens(2, 16), progress=False)


def test_pruning_the_tied_head_leaves_the_embedding_intact():
    m = tiny_model()
    m.config.tie_word_embeddings = True
    m.tie_weights()
    emb = m.get_input_embeddings().weight.detach().clone()
    lp.compress(m, lp.Recipe.from_dict({"steps": [{"method": "magnitude", "ignore": []}]}), progress=False)
    assert torch.equal(m.get_input_embeddings().weight, emb)
    assert (m.lm_head.weight == 0).float().mean() > 0.49


def test_owl_varies_block_sparsity_around_the_target():
    m = tiny_model()
    with torch.no_grad():  # block 1 gets strong outliers: OWL must prune it less
        m.model.layers[1].mlp.down_proj.weight[:, :4] *= 30
    rep = lp.compress(m, lp.Recipe.from_dict({"steps": [{"method": "wanda", "sparsity": 0.5, "owl": True,
                                                         "owl_lambda": 0.1}]}), correlated_tokens(8, 32),
                      progress=False)
    per_block = rep.structure[0]["block_sparsity"]
    assert abs(sum(per_block) / 2 - 0.5) < 1e-6 and per_block[1] < per_block[0]
    got = {x["name"].split(".")[2]: x["sparsity"] for x in rep.layers}
    assert abs(got["1"] - per_block[1]) < 0.01 and abs(got["0"] - per_block[0]) < 0.01
    with pytest.raises(RecipeError, match="not N:M"):
        lp.Recipe.from_dict({"steps": [{"method": "wanda", "pattern": "2:4", "owl": True}]})
