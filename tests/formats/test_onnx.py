import numpy as np
import pytest
import torch
from conftest import correlated_tokens, tiny_model

import llmpress as lp
from llmpress.formats.onnx import ONNXExportError, OnnxLM, save_onnx


def _rel(a, b) -> float:
    return float(np.linalg.norm(np.asarray(a) - np.asarray(b)) / np.linalg.norm(np.asarray(b)))


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_float_onnx_matches_torch_with_cache(tmp_path, tokenizer, arch):
    """onnxruntime's logits equal transformers' (fp32), greedy generation through the exported
    KV cache equals transformers' generate, and a left-padded batch with attention_mask and
    position_ids gives the same logits as transformers on the real tokens."""
    m = tiny_model(arch)
    m.llmpress_tokenizer = tokenizer
    s = lp.export(m, tmp_path / "o", "onnx")
    assert s["weights"] == "float32" and (tmp_path / "o" / "README.md").exists()
    assert (tmp_path / "o" / "tokenizer.json").exists() and (tmp_path / "o" / "config.json").exists()
    r = OnnxLM(tmp_path / "o")
    t = correlated_tokens(2, 20)
    with torch.no_grad():
        ref = m(t).logits.numpy()
    assert _rel(r.logits(t.numpy()), ref) < 1e-5
    ids = t[0, :8].tolist()
    want = m.generate(torch.tensor([ids]), max_new_tokens=12, do_sample=False)[0, 8:].tolist()
    assert r.generate(ids, 12) == want
    # left padding: row 1 has 5 pad tokens
    am = np.ones((2, 12), np.int64)
    am[1, :5] = 0
    pos = np.clip(np.cumsum(am, 1) - 1, 0, None)
    x = t[:, :12].numpy().copy()
    feed = {"input_ids": x, "attention_mask": am, "position_ids": pos}
    for i in r.past:
        feed[i.name] = np.zeros((2, i.shape[1], 0, i.shape[3]), np.float32)
    got = r.sess.run(["logits"], feed)[0]
    with torch.no_grad():
        ref = m(torch.from_numpy(x), attention_mask=torch.from_numpy(am), position_ids=torch.from_numpy(pos)).logits
    assert _rel(got[1, 5:], ref[1, 5:].numpy()) < 1e-5 and _rel(got[0], ref[0].numpy()) < 1e-5


def test_int4_onnx_keeps_gptq_integers(tmp_path, tokenizer):
    """GPTQ 4-bit asymmetric g32 -> MatMulNBits with the same integers: with float32 embeddings
    the logits equal the torch model's; with the default int8 embedding / head they stay close
    and greedy generation agrees. Float layers are rounded to 4 bits."""
    m = tiny_model("llama")
    m.llmpress_tokenizer = tokenizer
    lp.compress(m, lp.recipe("w4a16-gptq", group_size=32, symmetric=False), correlated_tokens(4, 32), progress=False)
    t = correlated_tokens(2, 20)
    with torch.no_grad():
        ref = m(t).logits.numpy()
    s = save_onnx(m, tmp_path / "f", "int4", embeddings="float32")
    assert not s["notes"]
    assert _rel(OnnxLM(tmp_path / "f").logits(t.numpy()), ref) < 1e-5
    save_onnx(m, tmp_path / "q", "int4")
    r = OnnxLM(tmp_path / "q")
    assert _rel(r.logits(t.numpy()), ref) < 0.05
    ids = t[0, :8].tolist()
    assert r.generate(ids, 8) == m.generate(torch.tensor([ids]), max_new_tokens=8, do_sample=False)[0, 8:].tolist()
    import onnx

    ops = {n.op_type for n in onnx.load(str(tmp_path / "q" / "model.onnx")).graph.node}
    assert "MatMulNBits" in ops and "MatMul" in ops  # attention products stay MatMul; no float weight MatMul left
    g = onnx.load(str(tmp_path / "q" / "model.onnx")).graph
    assert not [i.name for i in g.initializer if i.name.endswith("weight_t")]


def test_onnx_errors_leave_nothing(tmp_path, tokenizer):
    m = tiny_model("gemma")
    with pytest.raises(ONNXExportError, match="model_type 'gemma'"):
        save_onnx(m, tmp_path / "g")
    m = tiny_model("llama")
    with pytest.raises(ONNXExportError, match="int3"):
        save_onnx(m, tmp_path / "g", "int3")
    (tmp_path / "g").mkdir()
    (tmp_path / "g" / "keep.txt").write_text("keep me")
    with pytest.raises(FileExistsError, match="overwrite"):
        save_onnx(m, tmp_path / "g")
    assert (tmp_path / "g" / "keep.txt").read_text() == "keep me"
    w8a8 = tiny_model("llama")
    lp.compress(w8a8, lp.recipe("w8a8-fp8"), None, progress=False)
    with pytest.raises(ONNXExportError, match="activation quantization"):
        save_onnx(w8a8, tmp_path / "a")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["g"]


def test_real_model_int4_onnx(tmp_path):
    """smollm2-135m RTN W4 g64 -> int4 ONNX: >= 5x smaller than the fp32 ONNX, logits near the
    torch model's, the same greedy continuation."""
    m = lp.load("smollm2-135m")
    tok = m.llmpress_tokenizer
    lp.compress(m, lp.recipe("w4a16-rtn", group_size=64), None, progress=False)
    f = save_onnx(lp.load("smollm2-135m"), tmp_path / "f32")
    q = save_onnx(m, tmp_path / "q", "int4")
    assert f["size_mb"] / q["size_mb"] >= 5
    ids = tok("The capital of France is", add_special_tokens=False)["input_ids"]
    r = OnnxLM(tmp_path / "q", threads=2)
    with torch.no_grad():
        ref = m(torch.tensor([ids])).logits.numpy()
    assert _rel(r.logits([ids]), ref) < 0.05
    assert r.generate(ids, 8) == m.generate(torch.tensor([ids]), max_new_tokens=8, do_sample=False)[0, len(ids):].tolist()
