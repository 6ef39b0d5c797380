"""Streaming compression from safetensors shards: same result as the in-memory pass, resume
after a crash gives the same bytes, clear errors for corrupted inputs."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from transformers import AutoModelForCausalLM

import llmpress as lp
from llmpress import stream
from llmpress.formats.compressed_tensors import OutputExistsError
from llmpress.recipe import Recipe, RecipeError
from tests.conftest import tiny_config, tiny_model


def _checkpoint(tmp: Path, arch: str = "llama", blocks: int = 4, tie: bool = False) -> Path:
    """A sharded fp32 checkpoint whose shard boundaries fall inside blocks."""
    cfg = tiny_config(arch)
    cfg.num_hidden_layers = blocks
    cfg.tie_word_embeddings = tie
    torch.manual_seed(0)
    m = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32).eval()
    ref = tiny_model(arch)
    with torch.no_grad():
        for p in m.parameters():
            if p.dim() == 2:
                p.normal_(0, 0.08)
        m.get_input_embeddings().weight.copy_(ref.get_input_embeddings().weight)
    d = tmp / "src"
    m.save_pretrained(d, max_shard_size="40KB")
    return d


def _tokens(n: int = 8, seqlen: int = 32) -> torch.Tensor:
    return torch.randint(0, 256, (n, seqlen), generator=torch.Generator().manual_seed(1))


def _hashes(d: Path) -> dict[str, str]:
    return {f.name: hashlib.sha256(f.read_bytes()).hexdigest() for f in sorted(d.iterdir()) if f.is_file()}


def _recipe(name: str = "w4a16-gptq", **kw):
    return lp.recipe(name, group_size=32, **kw)


def test_shards_split_inside_blocks(tmp_path):
    d = _checkpoint(tmp_path)
    files = {}
    for f in d.glob("*.safetensors"):
        with safe_open(str(f), framework="pt") as sf:
            for k in sf.keys():
                if k.startswith("model.layers.1."):
                    files[f.name] = True
    assert len(files) >= 2  # block 1 spans shards


@pytest.mark.parametrize("name", ["w4a16-gptq", "w4a16-awq"])
def test_stream_matches_in_memory(tmp_path, name):
    d = _checkpoint(tmp_path)
    r, tokens = _recipe(name), _tokens()
    rep = stream.compress_streaming(d, r, tokens, tmp_path / "out", progress=False)
    assert len(rep.layers) == 4 * 7 and rep.calib_tokens == tokens.numel()
    ref = lp.load(d)
    lp.compress(ref, r, tokens, progress=False)
    got = lp.load(tmp_path / "out")
    x = _tokens(2, 16)
    with torch.no_grad():
        torch.testing.assert_close(got(x).logits, ref(x).logits, rtol=0, atol=0)
    # the output has one shard per block plus one for the rest, an index, the config
    files = sorted(p.name for p in (tmp_path / "out").glob("*.safetensors"))
    assert len(files) == 5 and (tmp_path / "out" / "model.safetensors.index.json").exists()
    assert not list(tmp_path.glob(".out.llmpress-partial*"))
    cfg = json.loads((tmp_path / "out" / "config.json").read_text())
    assert cfg["quantization_config"]["format"] == "pack-quantized"
    # transformers reads it with compressed-tensors
    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "out", dtype=torch.float32)
    with torch.no_grad():
        torch.testing.assert_close(hf(x).logits, ref(x).logits, rtol=1e-4, atol=1e-4)


def test_stream_prune_quant_and_head(tmp_path):
    """2:4 SparseGPT + GPTQ in the blocks, the output head quantized with RTN (outside the
    blocks), tied embeddings untied for it."""
    d = _checkpoint(tmp_path, tie=True)
    r = Recipe.from_dict({"name": "sp", "steps": [
        {"method": "sparsegpt", "sparsity": 0.5, "pattern": "2:4", "ignore": ["lm_head"]},
        {"method": "gptq", "bits": 4, "group_size": 32, "ignore": ["lm_head"]},
        {"method": "rtn", "bits": 8, "group_size": -1, "targets": ["re:^lm_head$"], "ignore": []}]})
    tokens = _tokens()
    stream.compress_streaming(d, r, tokens, tmp_path / "out", progress=False)
    ref = lp.load(d)
    lp.compress(ref, r, tokens, progress=False)
    got = lp.load(tmp_path / "out")
    x = _tokens(2, 16)
    with torch.no_grad():
        torch.testing.assert_close(got(x).logits, ref(x).logits, rtol=0, atol=0)
    assert type(got.lm_head).__name__ == "QuantLinear"
    assert got.get_input_embeddings().weight.shape == (256, 64)


def test_resume_after_crash_is_byte_identical(tmp_path, monkeypatch):
    d = _checkpoint(tmp_path, blocks=5)
    r, tokens = _recipe(), _tokens()
    stream.compress_streaming(d, r, tokens, tmp_path / "a", progress=False)

    real = stream._write_atomic
    calls = []

    def crash(tensors, path):
        calls.append(path.name)
        if path.name.startswith("model-00003-"):
            raise KeyboardInterrupt("killed")  # after 2 finished blocks
        real(tensors, path)

    monkeypatch.setattr(stream, "_write_atomic", crash)
    with pytest.raises(KeyboardInterrupt):
        stream.compress_streaming(d, r, tokens, tmp_path / "b", progress=False)
    monkeypatch.setattr(stream, "_write_atomic", real)
    partial = tmp_path / ".b.llmpress-partial"
    assert json.loads((partial / "progress.json").read_text())["done"] == 2
    assert not (tmp_path / "b").exists()

    seen = []
    orig = stream.Shards.load
    monkeypatch.setattr(stream.Shards, "load", lambda self, names, *a: seen.extend(names) or orig(self, names, *a))
    stream.compress_streaming(d, r, tokens, tmp_path / "b", progress=False)
    assert not any(n.startswith(("model.layers.1.",)) for n in seen)  # finished blocks were not recompressed
    assert _hashes(tmp_path / "a") == _hashes(tmp_path / "b")

    # a different recipe does not pick up another run's partial output
    with pytest.raises(KeyboardInterrupt):
        monkeypatch.setattr(stream, "_write_atomic", crash)
        calls.clear()
        stream.compress_streaming(d, r, tokens, tmp_path / "c", progress=False)
    monkeypatch.setattr(stream, "_write_atomic", real)
    stream.compress_streaming(d, _recipe(bits=3), tokens, tmp_path / "c", progress=False)
    assert _hashes(tmp_path / "c") != _hashes(tmp_path / "a")


def test_corrupted_and_bad_inputs(tmp_path):
    d = _checkpoint(tmp_path)
    r, tokens = _recipe(), _tokens()
    with pytest.raises(RecipeError, match="without --stream"):
        stream.compress_streaming(d, lp.recipe("drop25-angular"), tokens, tmp_path / "o", progress=False)
    with pytest.raises(RecipeError, match="without --stream"):
        stream.compress_streaming(d, lp.recipe("svd80"), tokens, tmp_path / "o", progress=False)
    with pytest.raises(OutputExistsError, match="input model"):
        stream.compress_streaming(d, r, tokens, d, progress=False)
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("keep")
    with pytest.raises(OutputExistsError, match="not empty"):
        stream.compress_streaming(d, r, tokens, tmp_path / "full", progress=False)
    assert (tmp_path / "full" / "x").read_text() == "keep"
    with pytest.raises(FileNotFoundError, match="checkpoint directory"):
        stream.compress_streaming(tmp_path / "nope", r, tokens, tmp_path / "o", progress=False)
    with pytest.raises(ValueError, match="needs calibration"):
        stream.compress_streaming(d, r, None, tmp_path / "o", progress=False)

    shard = sorted(d.glob("*.safetensors"))[1]
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) // 2])  # truncated
    with pytest.raises(stream.ShardError, match=shard.name):
        stream.compress_streaming(d, r, tokens, tmp_path / "o", progress=False)
    shard.write_bytes(b"\x00" * 16)  # garbage header
    with pytest.raises(stream.ShardError, match=shard.name):
        stream.compress_streaming(d, r, tokens, tmp_path / "o", progress=False)
    shard.write_bytes(data)

    from safetensors.torch import load_file, save_file
    t = load_file(str(shard))
    k = next(k for k in t if k.endswith("proj.weight"))
    t[k][0, 0] = float("nan")
    save_file(t, str(shard), metadata={"format": "pt"})
    with pytest.raises(ValueError, match="NaN"):
        stream.compress_streaming(d, r, tokens, tmp_path / "o", progress=False)
    assert not (tmp_path / "o").exists()
