import gguf
import numpy as np
import pytest
import torch
from conftest import correlated_tokens, tiny_model

import llmpress as lp
from llmpress.formats.gguf import GGUFExportError, save_gguf
from llmpress.quant import ggml

LEGACY = ["q8_0", "q4_0", "q4_1", "q5_0", "q5_1"]


def _edge_blocks() -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    b = torch.randn(64, 32, generator=g) * torch.logspace(-4, 1, 64).unsqueeze(1)
    b[0] = 0  # an all-zero block: scale 0
    b[1, 5], b[1, 9] = 2.0, -2.0  # ties for the largest magnitude
    b[2] = -b[2].abs()  # all negative
    b[3] = 0.5  # constant
    b[4, 0] = 1e-8  # tiny next to zeros
    b[5] = torch.arange(32) / 2 - 8  # exact half-way points on the q8 grid after scaling
    return b


@pytest.mark.parametrize("qtype", LEGACY + ["bf16"])
def test_blocks_bit_identical_to_reference(qtype):
    """Our torch quantizer writes the same bytes as the gguf package's port of ggml-quants.c."""
    ref_t = getattr(gguf.GGMLQuantizationType, qtype.upper())
    g = torch.Generator().manual_seed(1)
    for w in (torch.randn(48, 256, generator=g) * 0.05, _edge_blocks().reshape(16, 128)):
        ours = ggml.quantize_rows(w, qtype).numpy()
        ref = gguf.quants.quantize(w.numpy(), ref_t)
        assert ours.shape == ref.shape and np.array_equal(ours, ref), qtype
        back = gguf.quants.dequantize(ours, ref_t)
        assert back.shape == tuple(w.shape)
        if qtype != "bf16":  # a real quantizer: error well below the value range, not zero
            err = np.abs(back - w.numpy()).mean() / np.abs(w.numpy()).mean()
            assert 0 < err < {"q8_0": 0.01, "q5_0": 0.06, "q5_1": 0.06}.get(qtype, 0.12), (qtype, err)


def test_blocks_errors():
    with pytest.raises(ValueError, match="multiple of the q4_0 block size 32"):
        ggml.quantize_rows(torch.randn(4, 48), "q4_0")
    with pytest.raises(ValueError, match="not supported"):
        ggml.quantize_rows(torch.randn(4, 64), "q3_x")


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_f32_gguf_reads_back_identically_in_transformers(tmp_path, tokenizer, arch):
    """F32 GGUF -> transformers' GGUF loader: same logits (names, Q/K permutation, metadata)."""
    m = tiny_model(arch)
    m.llmpress_tokenizer = tokenizer
    s = save_gguf(m, tmp_path / "m.gguf", "f32")
    assert not s["fallback"] and set(s["tensors"].values()) == {"f32"}
    back = lp.load(tmp_path / "m.gguf")
    t = correlated_tokens(2, 24)
    with torch.no_grad():
        torch.testing.assert_close(back(t).logits, m(t).logits, rtol=1e-5, atol=1e-5)
    assert back.llmpress_tokenizer.convert_ids_to_tokens(list(range(40))) == tokenizer.convert_ids_to_tokens(list(range(40)))


def test_q8_gguf_compressed_model(tmp_path, tokenizer):
    """A compressed model exports (dequantized, re-rounded to Q8_0); gguf's reader sees Q8_0
    blocks and 1-D tensors in F32; transformers' logits stay close to the source's."""
    m = tiny_model("llama")
    m.llmpress_tokenizer = tokenizer
    lp.compress(m, lp.recipe("w8a16"), None, progress=False)
    s = save_gguf(m, tmp_path / "q8.gguf", "q8_0")
    r = gguf.GGUFReader(tmp_path / "q8.gguf")
    types = {t.name: t.tensor_type.name for t in r.tensors}
    assert types["blk.0.attn_q.weight"] == "Q8_0" and types["blk.0.attn_norm.weight"] == "F32"
    assert types == {k: v.upper() for k, v in s["tensors"].items()}
    assert r.fields["general.file_type"].contents() == 7
    back = lp.load(tmp_path / "q8.gguf")
    t = correlated_tokens(2, 24)
    with torch.no_grad():
        a, b = back(t).logits, m(t).logits
    assert (a.argmax(-1) == b.argmax(-1)).float().mean() > 0.95
    assert (a - b).abs().max() < 0.05 * b.abs().max()


def test_gguf_errors_leave_nothing(tmp_path, tokenizer):
    m = tiny_model("gemma")
    m.llmpress_tokenizer = tokenizer
    with pytest.raises(GGUFExportError, match="model_type 'gemma'"):
        save_gguf(m, tmp_path / "g.gguf")
    m = tiny_model("llama")
    m.llmpress_tokenizer = tokenizer
    with pytest.raises(GGUFExportError, match="q3_x"):
        save_gguf(m, tmp_path / "g.gguf", "q3_x")
    (tmp_path / "g.gguf").write_text("keep me")
    with pytest.raises(FileExistsError, match="overwrite"):
        save_gguf(m, tmp_path / "g.gguf")
    assert (tmp_path / "g.gguf").read_text() == "keep me"
    del m.llmpress_tokenizer
    with pytest.raises(GGUFExportError, match="tokenizer"):
        save_gguf(m, tmp_path / "g2.gguf")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["g.gguf"]  # no partial or temp files
