"""The decode runtime (static cache, in-graph sampling, speculative decoding) on the CPU path,
against transformers' own generate."""

from __future__ import annotations

import json

import pytest
import torch

from conftest import tiny_model
from llmpress.cli import main
from llmpress.runtime import Runtime, SpeculativeRuntime


def _ids(n: int = 10, seed: int = 0) -> torch.Tensor:
    return torch.randint(3, 256, (1, n), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gemma2", "gemma3"])
def test_greedy_matches_transformers_generate(arch):
    m = tiny_model(arch)
    ids = _ids()
    ref = m.generate(ids, max_new_tokens=40, min_new_tokens=40, do_sample=False)  # past gemma's 16-token window
    rt = Runtime(m, max_len=64)
    out, st = rt.generate(ids, 40)
    assert torch.equal(out, ref)
    assert st.new_tokens == 39 and st.decode_tps > 0 and st.prompt_tokens == 10 and not st.cuda_graph
    again, _ = rt.generate(ids[:, :7], 20)  # the cache is reused across calls
    assert torch.equal(again, m.generate(ids[:, :7], max_new_tokens=20, min_new_tokens=20, do_sample=False))


def test_sampling_is_seeded_and_top_k_1_is_greedy():
    m = tiny_model("llama")
    rt = Runtime(m, max_len=64)
    ids = _ids()
    a, _ = rt.generate(ids, 30, temperature=1.0, top_p=0.9, seed=3)
    b, _ = rt.generate(ids, 30, temperature=1.0, top_p=0.9, seed=3)
    c, _ = rt.generate(ids, 30, temperature=1.0, seed=4)
    g, _ = rt.generate(ids, 30)
    k1, _ = rt.generate(ids, 30, temperature=0.8, top_k=1, seed=5)
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert torch.equal(k1, g)


def test_eos_stops_and_bad_lengths():
    m = tiny_model("llama")
    rt = Runtime(m, max_len=64)
    ids = _ids()
    full, _ = rt.generate(ids, 30)
    eos = int(full[0, 10 + 5])  # the 6th generated token
    out, st = rt.generate(ids, 30, eos_token_id=eos)
    first = (full[0, 10:] == eos).nonzero()[0, 0].item()
    assert out.shape[1] == 10 + first + 1 and int(out[0, -1]) == eos
    with pytest.raises(ValueError, match="exceeds max_len"):
        rt.generate(ids, 60)


@pytest.mark.parametrize("k", [1, 3])
def test_speculative_is_target_greedy(k):
    target = tiny_model("llama", seed=0)
    draft = tiny_model("llama", seed=0)
    with torch.no_grad():  # a slightly different draft: some proposals get rejected
        for p in draft.parameters():
            p.add_(0.05 * torch.randn_like(p))
    ids = _ids()
    ref = target.generate(ids, max_new_tokens=40, min_new_tokens=40, do_sample=False)
    out, st = SpeculativeRuntime(target, draft, k=k, max_len=64).generate(ids, 40)
    assert torch.equal(out, ref)
    assert 1.0 <= st.accepted_per_step <= k + 1
    # the target as its own draft accepts everything: k + 1 tokens per target step
    same, st2 = SpeculativeRuntime(target, target, k=k, max_len=64).generate(ids, 40)
    assert torch.equal(same, ref) and st2.accepted_per_step > k


def test_speculative_rejects_other_vocab():
    a = tiny_model("llama")
    b = tiny_model("llama")
    b.resize_token_embeddings(300)
    with pytest.raises(ValueError, match="tokenizer"):
        SpeculativeRuntime(a, b)


def test_cli_generate_and_bench_speed(tiny_dir, tmp_path, capsys):
    assert main(["generate", str(tiny_dir), "-p", "The quick brown fox", "-n", "12"]) == 0
    assert "tokens, prefill" in capsys.readouterr().err
    assert main(["generate", str(tiny_dir), "-p", "x", "-n", "8", "--draft", str(tiny_dir), "--spec-k", "2"]) == 0
    assert "tokens per target step" in capsys.readouterr().err
    j = tmp_path / "s.json"
    assert main(["bench-speed", str(tiny_dir), "--prompt-len", "16", "--new-tokens", "16", "--repeats", "1",
                 "--baseline", "--json", str(j)]) == 0
    r = json.loads(j.read_text())
    assert r["decode_tokens_per_s"] > 0 and r["baseline_eager_tokens_per_s"] > 0 and r["device"] == "cpu"
    assert "decode tok/s" in capsys.readouterr().out
    if not torch.cuda.is_available():
        assert main(["generate", str(tiny_dir), "-p", "x", "--device", "cuda"]) == 2
        assert "no CUDA GPU" in capsys.readouterr().err
    assert main(["generate", str(tiny_dir), "-p", "x", "--chat"]) == 2
    assert "chat template" in capsys.readouterr().err


def test_compiled_decode_step_matches_eager():
    """Runtime(compile=True): the decode step through torch.compile gives the eager runtime's
    greedy tokens, dense and with int4 layers (opaque ops: no graph break, no per-block recompile)."""
    import torch._dynamo

    from llmpress.kernels import make_opaque
    from llmpress.nn import QuantLinear
    from llmpress.quant.primitives import QuantScheme
    from llmpress.quant.rtn import rtn

    torch.manual_seed(0)
    m = tiny_model("llama").to(torch.bfloat16)
    ids = _ids()
    want, _ = Runtime(m, max_len=40).generate(ids, 12)
    got, _ = Runtime(m, max_len=40, compile=True).generate(ids, 12)
    assert torch.equal(got, want)
    for name, mod in list(m.named_modules()):
        for cn, c in list(mod.named_children()):
            if isinstance(c, torch.nn.Linear) and ".layers." in f".{name}.":
                qw = rtn(c.weight.detach().float(), QuantScheme(4, True, "group", 32))
                qw.scale = qw.scale.to(torch.bfloat16)
                setattr(mod, cn, QuantLinear(qw, c.bias))
    assert make_opaque(m) > 0
    torch._dynamo.reset()
    want, _ = Runtime(m, max_len=40).generate(ids, 12)
    with torch._dynamo.config.patch(error_on_recompile=True):  # one graph for every block, not one per block
        got, _ = Runtime(m, max_len=40, compile=True).generate(ids, 12)
    assert torch.equal(got, want)
