import json

import pytest
import torch
from conftest import correlated_tokens, tiny_model

import llmpress as lp
from llmpress.formats.compressed_tensors import OutputExistsError
from llmpress.nn import QuantLinear


@pytest.mark.parametrize("rec, g", [("w4a16-gptq", 32), ("w8a16", None), ("w3a16-rtn", 16)])
@pytest.mark.parametrize("symmetric", [True, False])
def test_transformers_loads_our_checkpoint(tmp_path, tokenizer, rec, g, symmetric):
    """The real reader: transformers + compressed-tensors gives our model's logits.

    Asymmetric checkpoints keep compressed-tensors' packed zero points (what its own
    compressor and vLLM use); transformers' default compressed path does not size them
    (upstream llm-compressor#1618), so those load with ``dequantize=True``."""
    from transformers import AutoModelForCausalLM, CompressedTensorsConfig

    m = tiny_model("llama")
    r = lp.recipe(rec, group_size=g, symmetric=symmetric)
    lp.compress(m, r, correlated_tokens(8, 32), progress=False)
    m.llmpress_tokenizer = tokenizer
    out = lp.save(m, tmp_path / "ckpt")
    cfg = json.loads((out / "config.json").read_text())
    qc = cfg["quantization_config"]
    assert qc["quant_method"] == "compressed-tensors" and qc["format"] == "pack-quantized"
    w = qc["config_groups"]["group_0"]["weights"]
    assert w["num_bits"] == r.steps[0].bits and w["symmetric"] == symmetric
    kw = {} if symmetric else {"quantization_config": CompressedTensorsConfig(dequantize=True)}
    hf = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32, **kw)
    t = correlated_tokens(2, 32, seed=5)
    with torch.no_grad():
        a, b = m(t).logits, hf(t).logits
    assert torch.allclose(a, b, atol=1e-4, rtol=1e-4), (a - b).abs().max()
    assert (out / "tokenizer.json").exists() and (out / "llmpress_recipe.json").exists()


def test_llmpress_load_is_bit_exact(tmp_path):
    m = tiny_model("qwen3")
    lp.compress(m, lp.recipe("w4a16-gptq", group_size=16, symmetric=False), correlated_tokens(4, 32), progress=False)
    lp.save(m, tmp_path / "q")
    back = lp.load(tmp_path / "q")
    qa = {n: x for n, x in m.named_modules() if isinstance(x, QuantLinear)}
    qb = {n: x for n, x in back.named_modules() if isinstance(x, QuantLinear)}
    assert qa.keys() == qb.keys()
    for n in qa:
        assert torch.equal(qa[n].qdata, qb[n].qdata) and torch.equal(qa[n].scale, qb[n].scale)
        assert torch.equal(qa[n].zero, qb[n].zero)
    sa, sb = m.state_dict(), back.state_dict()
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k


def test_refuses_nonempty_output_and_input_dir(tmp_path, tiny_dir):
    m = tiny_model("llama")
    lp.compress(m, lp.recipe("w8a16"), None, progress=False)
    out = tmp_path / "o"
    out.mkdir()
    (out / "keep.txt").write_text("precious")
    with pytest.raises(OutputExistsError, match="not empty"):
        lp.save(m, out)
    assert [p.name for p in out.iterdir()] == ["keep.txt"]
    lp.save(m, out, overwrite=True)
    assert (out / "config.json").exists() and not (out / "keep.txt").exists()
    src = lp.load(tiny_dir)
    lp.compress(src, lp.recipe("w8a16"), None, progress=False)
    before = sorted(p.name for p in tiny_dir.iterdir())
    with pytest.raises(OutputExistsError, match="input model"):
        lp.save(src, tiny_dir, overwrite=True)
    assert sorted(p.name for p in tiny_dir.iterdir()) == before


def test_failed_save_leaves_nothing(tmp_path, monkeypatch):
    from llmpress.formats import compressed_tensors as ct

    m = tiny_model("llama")
    lp.compress(m, lp.recipe("w8a16"), None, progress=False)

    def boom(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(ct, "_write_shards", boom)
    with pytest.raises(OSError, match="disk full"):
        lp.save(m, tmp_path / "out")
    assert list(tmp_path.iterdir()) == []


def test_sharded_write_reads_back(tmp_path, monkeypatch):
    from llmpress.formats import compressed_tensors as ct

    monkeypatch.setattr(ct, "SHARD_BYTES", 20_000)
    m = tiny_model("llama")
    lp.compress(m, lp.recipe("w4a16-rtn", group_size=32), None, progress=False)
    lp.save(m, tmp_path / "s")
    assert len(list((tmp_path / "s").glob("*.safetensors"))) > 1
    assert (tmp_path / "s" / "model.safetensors.index.json").exists()
    t = correlated_tokens(1, 16)
    with torch.no_grad():
        assert torch.equal(lp.load(tmp_path / "s")(t).logits, m(t).logits)


@pytest.mark.parametrize("rec, fmt", [("w8a8-fp8", "float-quantized"), ("w8a8-int8", "int-quantized"),
                                      ("w8a8-int8-static", "int-quantized")])
def test_w8a8_checkpoints_run_in_transformers_with_activation_quantization(tmp_path, rec, fmt):
    """transformers + compressed-tensors quantizes the activations at run time as we simulate
    them: the logits are identical, and differ from a weights-only (dequantize) load."""
    from transformers import AutoModelForCausalLM, CompressedTensorsConfig

    m = tiny_model("llama", seed=1)
    lp.compress(m, lp.recipe(rec), correlated_tokens(8, 32), progress=False)
    out = lp.save(m, tmp_path / "ckpt")
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    grp = qc["config_groups"]["group_0"]
    assert qc["format"] == fmt and grp["input_activations"]["num_bits"] == 8
    t = correlated_tokens(2, 32, seed=5)
    hf = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    weights_only = AutoModelForCausalLM.from_pretrained(
        out, dtype=torch.float32, quantization_config=CompressedTensorsConfig(dequantize=True))
    back = lp.load(out)
    with torch.no_grad():
        a, b, c, d = m(t).logits, hf(t).logits, weights_only(t).logits, back(t).logits
    assert torch.equal(a, d)
    assert torch.allclose(a, b, atol=1e-5, rtol=1e-5), (a - b).abs().max()
    assert not torch.allclose(a, c, atol=1e-4)
