import pytest
import torch
from conftest import correlated_tokens, tiny_model

from llmpress.quant.kvcache import KVScheme, QuantizedKVCache, fake_quant_kv


@pytest.mark.parametrize("spec", ["int8", "int8-token", "fp8", "fp8-token"])
def test_fake_quant_kv_error_bounds(spec):
    s = KVScheme.parse(spec)
    x = torch.randn(2, 4, 9, 16) * torch.linspace(0.1, 10, 4).reshape(1, 4, 1, 1)
    y = fake_quant_kv(x, s)
    rel = ((y - x).norm() / x.norm()).item()
    assert 0 < rel < (0.01 if s.type == "int" else 0.05), rel
    if s.type == "int" and s.granularity == "head":  # per-head scales: the small heads stay accurate
        small = ((y - x)[:, 0].norm() / x[:, 0].norm()).item()
        tok = fake_quant_kv(x, KVScheme("int", "token"))
        assert small < ((tok - x)[:, 0].norm() / x[:, 0].norm()).item()


def test_bad_kv_specs():
    with pytest.raises(ValueError, match="int8 or fp8"):
        KVScheme.parse("int4")
    with pytest.raises(ValueError, match="granularity"):
        KVScheme.parse("int8-channel")


def test_generation_and_eval_use_the_quantized_cache(tokenizer):
    m = tiny_model("llama")
    t = correlated_tokens(1, 24)
    s = KVScheme("int", "token")
    with torch.no_grad():
        ref = m(t, use_cache=False).logits
        q = m(t, past_key_values=QuantizedKVCache(s, config=m.config), use_cache=True).logits
        full = m(t, past_key_values=QuantizedKVCache(s, config=m.config), use_cache=True).logits
    assert not torch.allclose(ref, q, atol=1e-6) and torch.allclose(q, full)
    assert ((q - ref).abs().max() / ref.abs().max()) < 0.05
    # prefill + one decode step equals the whole sequence through the quantized cache
    cache = QuantizedKVCache(s, config=m.config)
    with torch.no_grad():
        m(t[:, :-1], past_key_values=cache, use_cache=True)
        last = m(t[:, -1:], past_key_values=cache, use_cache=True).logits[:, -1]
    assert torch.allclose(last, q[:, -1], atol=1e-4)
    out = m.generate(t[:, :8], max_new_tokens=4, do_sample=False, past_key_values=QuantizedKVCache(s, config=m.config))
    assert out.shape == (1, 12)
