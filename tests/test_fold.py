import pytest
import torch
from conftest import ARCHS, tiny_model

from llmpress import fold
from llmpress.models import find_blocks


def _block_and_input(arch):
    m = tiny_model(arch)
    _, blocks = find_blocks(m)
    calls = []

    def grab(mod, args, kwargs):
        calls.append((args, kwargs))
        raise StopIteration

    h = blocks[0].register_forward_pre_hook(grab, with_kwargs=True)
    try:
        m(torch.randint(0, 256, (2, 16)), use_cache=False)
    except StopIteration:
        pass
    h.remove()
    args, kwargs = calls[0]

    def run():
        out = blocks[0](*args, **kwargs)
        return out[0] if isinstance(out, tuple) else out

    return blocks[0], run


def test_llama_groups():
    block, run = _block_and_input("llama")
    groups, _ = fold.trace(block, run)
    by = {g.linears: g for g in groups}
    assert by[("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")].prev == "input_layernorm"
    o = by[("self_attn.o_proj",)]
    assert (o.prev, o.kind, o.rep, o.head_dim) == ("self_attn.v_proj", "linear", 2, 16)  # 4 heads, 2 kv
    assert by[("mlp.gate_proj", "mlp.up_proj")].prev == "post_attention_layernorm"
    assert by[("mlp.down_proj",)].prev == "mlp.up_proj"


@pytest.mark.parametrize("arch", ARCHS)
def test_every_fold_keeps_the_float_block(arch):
    block, run = _block_and_input(arch)
    groups, ref = fold.trace(block, run)
    g = torch.Generator().manual_seed(0)
    n = 0
    for grp in groups:
        if grp.foldable:
            c = fold.producer_channels(grp, block)
            fold.apply(block, grp, torch.rand(c, generator=g) * 3 + 0.2)
            n += 1
    with torch.no_grad():
        ok, rel = fold.same_output(ref, run(), tol=1e-4)
    assert ok, (arch, rel)
    assert n >= 1 or arch in ("gpt_neox",), arch  # every family but fused-qkv NeoX gets a norm fold
