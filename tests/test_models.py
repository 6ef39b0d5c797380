import pytest
import torch
from conftest import ARCHS, correlated_tokens, tiny_model
from torch import nn

import llmpress as lp
from llmpress.models import UnsupportedModelError, block_linears, find_blocks
from llmpress.nn import QuantLinear

EXPECTED_LINEARS = {"phi3": 4, "gpt2": 4, "gpt_neox": 4, "opt": 6}  # fused qkv / no gate


@pytest.mark.parametrize("arch", ARCHS)
def test_discover_and_compress_every_architecture(arch, tmp_path):
    model = tiny_model(arch)
    name, blocks = find_blocks(model)
    assert len(blocks) == 2
    lin = block_linears(blocks[0])
    assert len(lin) == EXPECTED_LINEARS.get(arch, 7), list(lin)
    tokens = correlated_tokens(8, 32)
    with torch.no_grad():
        ref = model(tokens[:2]).logits
    rep = lp.compress(model, lp.recipe("w4a16-gptq", group_size=32), tokens, progress=False)
    assert len(rep.layers) == 2 * len(lin)
    assert sum(isinstance(m, QuantLinear) for m in model.modules()) == 2 * len(lin)
    with torch.no_grad():
        out = model(tokens[:2]).logits
    assert torch.isfinite(out).all()
    rel = ((out - ref).norm() / ref.norm()).item()
    assert rel < 0.5, rel  # compressed, not destroyed
    # save -> llmpress.load gives the same integers and the same logits
    lp.save(model, tmp_path / "q")
    back = lp.load(tmp_path / "q")
    for (n1, m1), (n2, m2) in zip(
        [(n, m) for n, m in model.named_modules() if isinstance(m, QuantLinear)],
        [(n, m) for n, m in back.named_modules() if isinstance(m, QuantLinear)],
        strict=True,
    ):
        assert n1 == n2
        assert torch.equal(m1.qdata, m2.qdata) and torch.equal(m1.scale, m2.scale)
    with torch.no_grad():
        assert torch.equal(back(tokens[:2]).logits, out)


def test_unsupported_model_names_class():
    class NotADecoder(nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = nn.Linear(4, 4)

    with pytest.raises(UnsupportedModelError, match="NotADecoder.*ModuleList"):
        find_blocks(NotADecoder())


def test_missing_path_and_pickle_only(tmp_path):
    with pytest.raises(FileNotFoundError, match="no such model"):
        lp.load(tmp_path / "nope")
    d = tmp_path / "pickled"
    d.mkdir()
    (d / "config.json").write_text("{}")
    (d / "pytorch_model.bin").write_bytes(b"\x80\x02")
    with pytest.raises(ValueError, match="only safetensors"):
        lp.load(d)
    f = tmp_path / "notgguf.gguf"
    f.write_bytes(b"PK\x03\x04")
    with pytest.raises(ValueError, match="not GGUF"):
        lp.load(f)


def test_unsupported_architecture_dir(tmp_path):
    from transformers import T5Config, T5Model

    d = tmp_path / "t5"
    T5Model(T5Config(d_model=32, d_ff=32, num_layers=1, num_heads=2, d_kv=16, vocab_size=64)).save_pretrained(d)
    with pytest.raises(UnsupportedModelError, match="t5.*not a causal language model"):
        lp.load(d)


def test_hub_id_offline_message(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(FileNotFoundError, match="local\\s+directory|local directory"):
        lp.load("someone/some-model-that-is-not-cached")
