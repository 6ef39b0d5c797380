import math

import torch
import torch.nn.functional as F
from conftest import tiny_model

import llmpress as lp


def test_metrics_match_a_direct_computation(tokenizer, text_file):
    base = tiny_model("llama", seed=0)
    other = tiny_model("llama", seed=0)
    lp.compress(other, lp.recipe("w3a16-rtn", group_size=32), None, progress=False)
    r = lp.evaluate(other, base, tokenizer=tokenizer, source=str(text_file), seqlen=32, n_windows=3, progress=False)
    same = lp.evaluate(base, base, tokenizer=tokenizer, source=str(text_file), seqlen=32, n_windows=3, progress=False)
    w = lp.data.eval_windows(tokenizer, str(text_file), 32, 3)
    nll = kl = agree = 0.0
    with torch.no_grad():
        for x in w:
            lq = F.log_softmax(other(x[None]).logits[0, :-1], -1)
            lb = F.log_softmax(base(x[None]).logits[0, :-1], -1)
            nll += F.nll_loss(lq, x[1:], reduction="sum").item()
            kl += F.kl_div(lq, lb, log_target=True, reduction="sum").item()
            agree += (lq.argmax(-1) == lb.argmax(-1)).sum().item()
    n = 3 * 31
    assert r.tokens == n
    assert math.isclose(r.ppl, math.exp(nll / n), rel_tol=1e-5)
    assert math.isclose(r.kl, kl / n, rel_tol=1e-4)
    assert math.isclose(r.top1, agree / n)
    assert same.kl < 1e-6 and same.top1 == 1.0 and r.kl > 1e-4
    assert r.size_mb < same.size_mb and 3 < r.bits_per_weight < 4.5


def test_kv_cache_quantization_in_eval(tokenizer, text_file):
    from llmpress.quant.kvcache import KVScheme

    base = tiny_model("llama", seed=0)
    res = lp.evaluate_many({"base": base, "kv-int8": base, "kv-fp8": base}, base, tokenizer=tokenizer,
                           source=str(text_file), seqlen=32, n_windows=2, progress=False,
                           kv_cache={"kv-int8": KVScheme("int"), "kv-fp8": KVScheme("float")})
    assert res["base"].kl < 1e-6
    assert 0 < res["kv-int8"].kl < res["kv-fp8"].kl < 0.05  # int8 per head is finer than fp8's 3 mantissa bits
