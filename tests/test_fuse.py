"""Fused q/k/v and gate/up projections: the same outputs as the separate modules, the same state
dict, any call order, undone cleanly; under torch.compile too."""

from __future__ import annotations

import pytest
import torch

from conftest import tiny_model
from llmpress.fuse import fuse_projections, unfuse_projections
from llmpress.kernels import layout
from llmpress.runtime import Runtime


def _quantize(m, group: int = 32):
    from llmpress.nn import QuantLinear
    from llmpress.quant.primitives import QuantScheme
    from llmpress.quant.rtn import rtn

    for name, mod in list(m.named_modules()):
        for cn, c in list(mod.named_children()):
            if isinstance(c, torch.nn.Linear) and ".layers." in f".{name}.":
                qw = rtn(c.weight.detach().float(), QuantScheme(4, False, "group", group))
                setattr(mod, cn, QuantLinear(qw, c.bias))
    return m


def _ids(n: int = 9) -> torch.Tensor:
    return torch.randint(3, 256, (1, n), generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("arch,quant", [("llama", False), ("qwen2", False), ("gemma3", False), ("llama", True), ("qwen2", True),
                                        ("gemma3", True)])
def test_fused_logits_state_dict_and_unfuse(arch, quant):
    m = tiny_model(arch)
    if quant:
        _quantize(m)
    ids = _ids()
    with torch.no_grad():
        want = m(ids).logits
    keys = {k: v.clone() for k, v in m.state_dict().items()}
    n = fuse_projections(m)
    assert n == 2 * m.config.num_hidden_layers
    assert fuse_projections(m) == 0  # already fused
    with torch.no_grad():
        got = m(ids).logits
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    sd = m.state_dict()
    assert sd.keys() == keys.keys() and all(torch.equal(sd[k], keys[k]) for k in keys)
    attn = m.model.layers[0].self_attn
    if not quant:  # dense members are views into one stacked weight: no extra memory
        base = attn.q_proj.weight.untyped_storage().data_ptr()
        assert attn.k_proj.weight.untyped_storage().data_ptr() == base
    # any call order, and a member alone on a new input, gives that member's own product
    x = torch.randn(2, 3, m.config.hidden_size)
    with torch.no_grad():
        ref = {nm: torch.nn.functional.linear(x, getattr(attn, nm).weight, getattr(attn, nm).bias)
               for nm in ("q_proj", "k_proj", "v_proj")}
        for order in (("v_proj", "q_proj", "k_proj"), ("k_proj",), ("q_proj", "k_proj", "v_proj")):
            for nm in order:
                torch.testing.assert_close(getattr(attn, nm)(x), ref[nm], rtol=1e-5, atol=1e-5)
    assert unfuse_projections(m) == n
    if not quant:
        assert attn.k_proj.weight.untyped_storage().data_ptr() != attn.q_proj.weight.untyped_storage().data_ptr()
    with torch.no_grad():
        torch.testing.assert_close(m(ids).logits, want, rtol=1e-5, atol=1e-5)


def test_gradients_reach_member_parameters():
    """Training a fused model: members run their own forward, so each Parameter gets its gradient."""
    m = tiny_model("llama")
    ids = _ids()
    m(ids).logits.square().mean().backward()
    want = m.model.layers[0].self_attn.k_proj.weight.grad.clone()
    m.zero_grad()
    fuse_projections(m)
    m(ids).logits.square().mean().backward()
    torch.testing.assert_close(m.model.layers[0].self_attn.k_proj.weight.grad, want)
    unfuse_projections(m)


def test_fusions_die_with_their_model():
    """The op registry holds no model alive (a stacked quantized layout can be gigabytes)."""
    import gc

    from llmpress import fuse

    m = _quantize(tiny_model("llama"))
    fuse_projections(m)
    handles = {m.model.layers[0].self_attn.q_proj.__dict__[fuse._ATTR][0].handle}
    assert handles <= set(fuse._FUSIONS.keys())
    del m
    gc.collect()
    assert not handles & set(fuse._FUSIONS.keys())


def test_other_activation_dtype_takes_the_member_path():
    """A quantized group packed for float32 activations: a bf16 input runs the member's own
    forward (its own kernel path) instead of the float32 stacked layout."""
    m = _quantize(tiny_model("llama"))
    attn = m.model.layers[0].self_attn
    x = torch.randn(1, 2, m.config.hidden_size).bfloat16()
    with torch.no_grad():
        want = type(attn.k_proj).forward(attn.k_proj, x)
        fuse_projections(m, torch.float32)
        got = attn.k_proj(x)
    assert got.dtype == torch.bfloat16
    torch.testing.assert_close(got, want)
    unfuse_projections(m)


def test_mixed_groups_are_left_alone():
    """A group whose members differ (one quantized, one dense) is not fused."""
    m = tiny_model("llama")
    _quantize(m)
    mlp = m.model.layers[0].mlp
    mlp.up_proj = torch.nn.Linear(mlp.up_proj.in_features, mlp.up_proj.out_features, bias=False)
    assert fuse_projections(m) == 2 * m.config.num_hidden_layers - 1


def test_packed_cat_layouts():
    """layout.cat stacks packed weights along the output dimension in both layouts, and refuses
    weights that differ."""
    from llmpress.quant.primitives import QuantScheme
    from llmpress.quant.rtn import rtn

    g = torch.Generator().manual_seed(0)
    ws = [torch.randn(n, 256, generator=g) for n in (48, 16, 16)]
    x = torch.randn(3, 256, generator=g)
    for kmajor in (True, False):
        ps = [layout.pack(rtn(w, QuantScheme(4, True, "group", 64)), torch.float32, kmajor=kmajor) for w in ws]
        cat = layout.cat(ps)
        want = torch.cat([layout.reference_matmul(x, p) for p in ps], -1)
        torch.testing.assert_close(layout.reference_matmul(x, cat), want)
    other = layout.pack(rtn(ws[0], QuantScheme(4, True, "group", 128)), torch.float32)
    with pytest.raises(layout.UnsupportedLayout, match="do not stack"):
        layout.cat([ps[0], other])


@pytest.mark.parametrize("quant", [False, True])
def test_runtime_fused_greedy_and_compiled(quant):
    """Runtime(fuse=True) gives the unfused runtime's greedy tokens, eager and through
    torch.compile (the quantized stacked matmul is an opaque op there)."""
    import torch._dynamo

    torch.manual_seed(0)
    m = tiny_model("llama")
    if quant:
        _quantize(m)
    ids = _ids()
    want, _ = Runtime(m, max_len=40, fuse=False).generate(ids, 12)
    rt = Runtime(m, max_len=40, fuse=True)
    got, _ = rt.generate(ids, 12)
    assert torch.equal(got, want)
    torch._dynamo.reset()
    got, _ = Runtime(m, max_len=40, fuse=True, compile=True).generate(ids, 12)
    assert torch.equal(got, want)
    unfuse_projections(m)
