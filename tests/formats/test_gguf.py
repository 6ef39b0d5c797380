import gguf
import numpy as np
import pytest
import torch
from conftest import correlated_tokens, tiny_model, wide_llama

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


def test_k_mix_types_follow_llama_cpp():
    """smollm2-135m's Q4_K_M as llama.cpp 0.3.36 wrote it (bench/export.py compares every tensor):
    30 blocks, 576-wide rows fall back (Q4_K -> Q5_0, Q6_K -> Q8_0), ffn_down (1536) keeps K-quants,
    attn_v / ffn_down get Q6_K on the use_more_bits layers, the tied embedding is the output."""
    from collections import Counter

    from llmpress.formats.gguf import mix_type

    names = ["token_embd.weight"] + [f"blk.{i}.{k}.weight" for i in range(30) for k in
                                     ("attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down")]
    got = {n: mix_type("q4_k_m", n, 1536 if "ffn_down" in n else 576, 30, 3, tied=True) for n in names}
    assert Counter(t for t, _ in got.values()) == {"q5_0": 166, "q4_k": 16, "q6_k": 14, "q8_0": 15}
    assert got["blk.0.attn_v.weight"] == ("q8_0", "q6_k -> q8_0 (row length 576)")
    assert got["blk.3.ffn_down.weight"] == ("q4_k", None) and got["blk.5.ffn_down.weight"] == ("q6_k", None)
    assert mix_type("q3_k_m", "blk.1.attn_v.weight", 4096, 32, 4, False) == ("q5_k", None)
    assert mix_type("q3_k_m", "blk.9.attn_v.weight", 4096, 32, 4, False) == ("q4_k", None)
    assert mix_type("q2_k", "blk.9.attn_v.weight", 4096, 32, 4, False) == ("q4_k", None)  # GQA >= 4
    assert mix_type("q2_k", "blk.9.ffn_down.weight", 4096, 32, 4, False) == ("q3_k", None)
    assert mix_type("q2_k", "blk.9.ffn_up.weight", 576, 32, 4, False) == ("q4_0", "q2_k -> q4_0 (row length 576)")
    assert mix_type("q5_k_s", "output.weight", 4096, 32, 4, False) == ("q6_k", None)
    assert mix_type("q4_k_m", "blk.0.attn_q.weight", 48, 2, 1, False) == ("f16", "q4_k -> f16 (row length 48)")


def test_k_mix_gguf_reads_back(tmp_path, tokenizer):
    """A Q4_K_M file: the types llama.cpp's rules give, read by gguf's reader and by transformers
    with logits close to the float model's; with an importance matrix from calibration tokens
    every quantized tensor is solved weighted, and its weighted error is lower."""
    m = wide_llama(tokenizer)
    t = correlated_tokens(4, 32)
    s = lp.export(m, tmp_path / "k.gguf", "gguf:q4_k", calib=t, progress=False)  # alias of q4_k_m
    s0 = save_gguf(m, tmp_path / "k0.gguf", "q4_k_m")
    r = gguf.GGUFReader(tmp_path / "k.gguf")
    types = {x.name: x.tensor_type.name.lower() for x in r.tensors}
    assert r.fields["general.file_type"].contents() == 15
    assert types["blk.0.attn_v.weight"] == "q4_k" and types["blk.1.attn_v.weight"] == "q6_k"  # use_more_bits(1, 2)
    assert types["blk.0.ffn_down.weight"] == "q4_k" and types["blk.1.ffn_down.weight"] == "q6_k"
    assert types["output.weight"] == "q6_k" and types["token_embd.weight"] == "q4_k"
    assert types == s0["tensors"] and not s["fallback"]
    assert s["method"].pop("token_embd.weight") == "search"  # no importance for an embedding table
    assert set(s["method"].values()) == {"weighted"} and set(s0["method"].values()) == {"search"}
    save_gguf(m, tmp_path / "q40.gguf", "q4_0")
    with torch.no_grad():
        ref = m(t).logits
        rel = {f: float((lp.load(tmp_path / f)(t).logits - ref).norm() / ref.norm()) for f in ("k.gguf", "k0.gguf", "q40.gguf")}
    # random weights amplify rounding noise (0.24 relative here); the order is what is checked:
    # importance-weighted < plain Q4_K_M < pure Q4_0 (4.9 vs 4.5 bits per weight)
    assert rel["k.gguf"] < 0.97 * rel["k0.gguf"] and rel["k0.gguf"] < 0.85 * rel["q40.gguf"], rel
    from llmpress import calibrate

    imp = calibrate.input_moments(m, t, progress=False)["model.layers.0.mlp.down_proj"]
    w = m.model.layers[0].mlp.down_proj.weight.detach()
    err = {}
    for f in ("k.gguf", "k0.gguf"):
        x = next(x for x in gguf.GGUFReader(tmp_path / f).tensors if x.name == "blk.0.ffn_down.weight")
        y = torch.from_numpy(gguf.quants.dequantize(x.data, x.tensor_type)).reshape(w.shape)
        err[f] = float((imp * (y - w) ** 2).sum())
    assert err["k.gguf"] < 0.97 * err["k0.gguf"], err


def test_input_moments_are_mean_squared_inputs(tokenizer):
    from llmpress import calibrate

    m = tiny_model("llama")
    t = correlated_tokens(3, 16)
    seen = []
    h = m.model.layers[1].mlp.down_proj.register_forward_pre_hook(lambda mod, a: seen.append(a[0].detach().clone()))
    im = calibrate.input_moments(m, t, batch_size=2, progress=False)
    h.remove()
    x = torch.cat([s.reshape(-1, s.shape[-1]) for s in seen])
    torch.testing.assert_close(im["model.layers.1.mlp.down_proj"], (x ** 2).mean(0))
    assert "lm_head" in im and im["lm_head"].shape == (64,)


def test_gguf_carries_gptq_integers(tmp_path, tokenizer):
    """GPTQ 4-bit asymmetric, group 32: exported as Q5_0 the blocks keep GPTQ's integers (the
    GGUF weight equals the compressed layer's up to fp16 scales); the Q/K rows are permuted with
    their scales."""
    m = tiny_model("llama")
    m.llmpress_tokenizer = tokenizer
    lp.compress(m, lp.recipe("w4a16-gptq", group_size=32, symmetric=False), correlated_tokens(4, 32), progress=False)
    s = save_gguf(m, tmp_path / "g.gguf", "q5_0")
    assert s["method"]["blk.0.ffn_down.weight"] == "carried" and s["method"]["blk.0.attn_q.weight"] == "carried"
    assert s["method"]["token_embd.weight"] == "reference"
    from llmpress.formats.gguf import _permute_rope

    r = {x.name: x for x in gguf.GGUFReader(tmp_path / "g.gguf").tensors}
    for gname, mod, perm in (("blk.0.ffn_down.weight", m.model.layers[0].mlp.down_proj, None),
                             ("blk.1.attn_q.weight", m.model.layers[1].self_attn.q_proj, 4)):
        w = mod.weight.detach().float()
        if perm:
            w = _permute_rope(w, perm)
        y = torch.from_numpy(gguf.quants.dequantize(r[gname].data, r[gname].tensor_type)).reshape(w.shape)
        torch.testing.assert_close(y, w, rtol=2e-3, atol=2e-3 * float(w.abs().max()))
