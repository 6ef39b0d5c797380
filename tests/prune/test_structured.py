"""Removing decoder blocks: the right blocks go, the config follows, plain transformers loads
the result and generation with a KV cache still works."""

import json

import pytest
import torch

import llmpress as lp
from llmpress.prune.structured import block_distances, choose_blocks, drop_blocks
from llmpress.recipe import RecipeError
from tests.conftest import correlated_tokens, tiny_config


def _deep(arch="llama", layers=4, identity=(2,)):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    cfg = tiny_config(arch)
    cfg.num_hidden_layers = layers
    if hasattr(cfg, "layer_types") and cfg.layer_types is not None:
        cfg.layer_types = [cfg.layer_types[i % len(cfg.layer_types)] for i in range(layers)]
    m = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32).eval()
    with torch.no_grad():
        for p in m.parameters():
            if p.dim() == 2:
                p.normal_(0, 0.08)
        for i in identity:  # a block whose residual branches write nothing: output == input
            blk = m.model.layers[i]
            blk.self_attn.o_proj.weight.zero_()
            blk.mlp.down_proj.weight.zero_()
    return m


def test_angular_distance_finds_the_identity_block():
    m = _deep(identity=(2,))
    d = block_distances(m, correlated_tokens(4, 32))
    assert d.shape == (4,) and float(d[2]) < 1e-4 < float(d[[0, 1, 3]].min())
    assert choose_blocks(m, 1, "angular", correlated_tokens(4, 32))[0] == [2]
    assert choose_blocks(m, 2, "last")[0] == [2, 3]
    m2 = _deep(identity=(1, 2))
    assert choose_blocks(m2, 2, "contiguous", correlated_tokens(4, 32))[0] == [1, 2]


@pytest.mark.parametrize("arch", ["llama", "gemma3", "qwen2"])
def test_dropped_model_saves_loads_in_transformers_and_generates(arch, tmp_path):
    from transformers import AutoModelForCausalLM

    m = _deep(arch, identity=(1,))
    ids = correlated_tokens(2, 16, seed=2)
    with torch.no_grad():
        before = m(ids).logits
    rep = lp.compress(m, lp.Recipe.from_dict({"steps": [{"method": "drop_blocks", "fraction": 0.25}]}),
                      correlated_tokens(4, 32), progress=False)
    assert rep.structure[0]["removed"] == [1] and rep.structure[0]["blocks_after"] == 3
    assert m.config.num_hidden_layers == 3
    assert [b.self_attn.layer_idx for b in m.model.layers] == [0, 1, 2]
    with torch.no_grad():  # block 1 was an identity: removing it changes nothing
        assert torch.allclose(m(ids).logits, before, atol=1e-5)
    lp.save(m, tmp_path / "o")
    assert json.loads((tmp_path / "o" / "config.json").read_text())["num_hidden_layers"] == 3
    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "o", dtype=torch.float32).eval()
    with torch.no_grad():
        assert torch.equal(hf(ids).logits, m(ids).logits)
        cached = hf.generate(ids, max_new_tokens=6, do_sample=False)
        uncached = hf.generate(ids, max_new_tokens=6, do_sample=False, use_cache=False)
    assert torch.equal(cached, uncached)


def test_drop_then_quantize_sees_the_shallower_model():
    m = _deep()
    rep = lp.compress(m, lp.Recipe.from_dict({"steps": [
        {"method": "drop_blocks", "blocks": 2, "importance": "last"},
        {"method": "gptq", "bits": 4, "group_size": 32}]}), correlated_tokens(4, 32), progress=False)
    assert len(m.model.layers) == 2 and len(rep.layers) == 14
    assert {x["name"].split(".")[2] for x in rep.layers} == {"0", "1"}


@pytest.mark.parametrize("steps,msg", [
    ([{"method": "drop_blocks"}], "exactly one"),
    ([{"method": "drop_blocks", "blocks": 2, "fraction": 0.5}], "exactly one"),
    ([{"method": "drop_blocks", "blocks": 4}], "at least one must remain"),
    ([{"method": "drop_blocks", "fraction": 1.5}], "fraction"),
    ([{"method": "drop_blocks", "blocks": 1, "importance": "random"}], "importance"),
    ([{"method": "rtn", "bits": 8, "group_size": -1}, {"method": "drop_blocks", "blocks": 1}], "before the per-layer"),
])
def test_bad_drop_recipes(steps, msg):
    with pytest.raises(RecipeError, match=msg):
        lp.compress(_deep(), lp.Recipe.from_dict({"steps": steps}), correlated_tokens(2, 16), progress=False)


def test_drop_blocks_rejects_bad_indices():
    with pytest.raises(ValueError, match="bad block indices"):
        drop_blocks(_deep(), [0, 1, 2, 3])
    with pytest.raises(ValueError, match="bad block indices"):
        drop_blocks(_deep(), [7])


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_shrink_heads_and_mlp_loads_in_transformers(arch, tmp_path):
    from transformers import AutoModelForCausalLM

    m = _deep(arch, identity=())
    ids = correlated_tokens(2, 16, seed=2)
    rep = lp.compress(m, lp.Recipe.from_dict({"steps": [{"method": "shrink", "mlp": 0.25, "kv_groups": 1}]}),
                      correlated_tokens(4, 32), progress=False)
    assert m.config.intermediate_size == 96 and m.config.num_key_value_heads == 1
    assert m.config.num_attention_heads == 2 and m.config.head_dim == 16
    assert all(len(g) == 1 for g in rep.structure[0]["kept_kv_groups"])
    lp.save(m, tmp_path / "o")
    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "o", dtype=torch.float32).eval()
    with torch.no_grad():
        assert torch.equal(hf(ids).logits, m(ids).logits)
        assert torch.equal(hf.generate(ids, max_new_tokens=5, do_sample=False),
                           hf.generate(ids, max_new_tokens=5, do_sample=False, use_cache=False))
    assert sum(p.numel() for p in hf.parameters()) < sum(p.numel() for p in _deep(arch).parameters())


def test_shrink_keeps_important_channels():
    """A channel whose down_proj column is zero contributes nothing: it is removed first."""
    m = _deep(identity=())
    with torch.no_grad():
        for b in m.model.layers:
            b.mlp.down_proj.weight[:, :32] = 0  # 32 dead channels of 128
    ids = correlated_tokens(2, 16, seed=2)
    with torch.no_grad():
        before = m(ids).logits
    lp.compress(m, lp.Recipe.from_dict({"steps": [{"method": "shrink", "mlp": 0.25}]}), correlated_tokens(4, 32),
                progress=False)
    with torch.no_grad():
        assert torch.allclose(m(ids).logits, before, atol=1e-5)


@pytest.mark.parametrize("step,msg", [
    ({"method": "shrink"}, "needs 'mlp'"), ({"method": "shrink", "kv_groups": 2}, "at most 1"),
    ({"method": "shrink", "mlp": 1.0}, "mlp"), ({"method": "shrink", "kv_groups": 1.5}, "whole")])
def test_bad_shrink(step, msg):
    with pytest.raises(RecipeError, match=msg):
        lp.compress(_deep(), lp.Recipe.from_dict({"steps": [step]}), correlated_tokens(2, 16), progress=False)


def test_merge_kv_heads_to_gqa_and_mqa(tmp_path):
    """Multi-head attention whose paired KV heads are equal converts to GQA without change;
    real heads merge by mean pooling; transformers loads the result."""
    from transformers import AutoModelForCausalLM

    m = _deep("llama", identity=())
    m.config.num_key_value_heads = 4
    m2 = type(m)(m.config).eval()  # multi-head: 4 query and 4 key/value heads
    with torch.no_grad():
        for p in m2.parameters():
            if p.dim() == 2:
                p.normal_(0, 0.08)
        for b in m2.model.layers:
            for lin in (b.self_attn.k_proj, b.self_attn.v_proj):
                w = lin.weight.reshape(2, 2, 16, -1)
                w[:, 1] = w[:, 0]  # heads 2g and 2g+1 identical
    ids = correlated_tokens(2, 16, seed=2)
    with torch.no_grad():
        before = m2(ids).logits
    lp.compress(m2, lp.Recipe.from_dict({"steps": [{"method": "merge_kv", "kv_heads": 2}]}), progress=False)
    assert m2.config.num_key_value_heads == 2 and m2.model.layers[0].self_attn.k_proj.weight.shape == (32, 64)
    with torch.no_grad():
        assert torch.allclose(m2(ids).logits, before, atol=1e-5)
    lp.compress(m2, lp.Recipe.from_dict({"steps": [{"method": "merge_kv", "kv_heads": 1}]}), progress=False)
    lp.save(m2, tmp_path / "o")
    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "o", dtype=torch.float32).eval()
    assert hf.config.num_key_value_heads == 1
    with torch.no_grad():
        assert torch.equal(hf(ids).logits, m2(ids).logits)
    with pytest.raises(RecipeError, match="must divide"):
        lp.compress(_deep(), lp.Recipe.from_dict({"steps": [{"method": "merge_kv", "kv_heads": 3}]}), progress=False)


def test_block_distances_never_compute_logits():
    """The importance pass reads the blocks only: the output head (a [batch, seq, vocab] matmul,
    0.8 GB per batch on a 49k vocabulary) is swapped out while it runs, and put back."""
    from tests.conftest import tiny_model

    m = tiny_model("llama")
    head = m.get_output_embeddings()
    calls = []
    h = head.register_forward_hook(lambda *a: calls.append(1))
    d = block_distances(m, correlated_tokens(4, 32), batch_size=2)
    assert d.shape == (2,) and not calls
    assert m.get_output_embeddings() is head
    m(input_ids=correlated_tokens(1, 8))
    assert calls
    h.remove()
