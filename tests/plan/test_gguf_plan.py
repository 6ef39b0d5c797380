import gguf
import pytest
from conftest import correlated_tokens, wide_llama

import llmpress as lp
from llmpress.plan import allocate
from llmpress.plan.gguf import TYPES, measure_gguf, plan_types


def test_gguf_plan_measures_allocates_and_exports(tmp_path, tokenizer):
    """Every block linear gets an option per GGML type; predicted KL falls with bits for each
    layer; a 4.5 bits/weight plan fits its budget, mixes types, and the GGUF written with it has
    exactly those types (read back by gguf and transformers)."""
    m = wide_llama(tokenizer)
    t = correlated_tokens(4, 32)
    sens = measure_gguf(m, t, ("q2_k", "q4_k", "q6_k", "q8_0"), progress=False)
    assert len(sens.units) == 14 and all(len(u.options) == 4 for u in sens.units)
    for u in sens.units:
        kl = [o.kl for o in u.options]
        assert kl[0] > kl[1] > kl[2] > kl[3] >= 0, (u.names, kl)
    p = allocate(sens, target_bits=4.5)
    types = plan_types(p)
    assert p.planned_bytes * 8 <= 4.5 * sum(u.params for u in sens.units)
    assert len(set(types.values())) >= 2
    s = lp.export(m, tmp_path / "p.gguf", "gguf:q4_k_m", types=types, calib=t, progress=False)
    r = {x.name: x.tensor_type.name.lower() for x in gguf.GGUFReader(tmp_path / "p.gguf").tensors}
    assert r["blk.1.ffn_down.weight"] == types["model.layers.1.mlp.down_proj"]
    assert r["blk.0.attn_q.weight"] == types["model.layers.0.self_attn.q_proj"]
    assert s["tensors"]["output.weight"] == "q6_k"  # not planned: the mix decides
    lp.load(tmp_path / "p.gguf")
    with pytest.raises(ValueError, match="does not have"):
        lp.export(m, tmp_path / "x.gguf", "gguf:q4_k_m", types={"model.layers.9.mlp.down_proj": "q4_k"})
    with pytest.raises(ValueError, match="not supported"):
        lp.export(m, tmp_path / "x.gguf", "gguf:q4_k_m", types={"model.layers.0.mlp.down_proj": "q9_k"})
    assert not (tmp_path / "x.gguf").exists()
    assert set(TYPES) >= {"q2_k", "q4_0", "q8_0"}
