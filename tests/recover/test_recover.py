"""LoRA / QLoRA recovery by distillation on tiny seeded models: it must actually recover, resume
exactly, save adapters that peft loads with the same logits, and merge without changing them."""

from __future__ import annotations

import copy

import pytest
import torch

from conftest import correlated_tokens, tiny_model
from llmpress.nn import QuantLinear
from llmpress.recover import RecoverConfig, add_lora, kd_loss, load_adapter, merge_lora, recover, save_adapter
from llmpress.recover.lora import LoRALinear


def _kl(teacher, student, ids) -> float:
    with torch.no_grad():
        return float(kd_loss(student(input_ids=ids).logits, teacher(input_ids=ids).logits))


def _quantize_w3(model) -> None:
    from llmpress.models import block_linears, find_blocks, set_submodule
    from llmpress.quant.primitives import QuantScheme
    from llmpress.quant.rtn import rtn

    sch = QuantScheme(3, False, "group", 32)
    path, blocks = find_blocks(model)
    for i, b in enumerate(blocks):
        for n, m in block_linears(b).items():
            set_submodule(model, f"{path}.{i}.{n}", QuantLinear(rtn(m.weight.data, sch), m.bias))


def _prune_half(model) -> None:
    from llmpress.models import block_linears, find_blocks

    _, blocks = find_blocks(model)
    with torch.no_grad():
        for b in blocks:
            for m in block_linears(b).values():
                w = m.weight
                thr = w.abs().flatten().kthvalue(w.numel() // 2).values
                w.mul_(w.abs() > thr)


def test_lora_starts_as_identity_and_errors():
    m = tiny_model("llama")
    ids = correlated_tokens(2, 32)
    ref = m(input_ids=ids).logits
    names = add_lora(m, r=4, alpha=8)
    assert len(names) == 14 and all(isinstance(m.get_submodule(n), LoRALinear) for n in names)
    torch.testing.assert_close(m(input_ids=ids).logits, ref)
    with pytest.raises(ValueError, match="teacher"):
        recover(m, correlated_tokens(8, 32), teacher=None, cfg=RecoverConfig(steps=1), progress=False)
    with pytest.raises(ValueError, match="add_lora"):
        recover(tiny_model("llama"), correlated_tokens(8, 32), teacher=m, progress=False)
    with pytest.raises(ValueError, match="kd="):
        RecoverConfig(kd="sideways")
    with pytest.raises(ValueError, match="no linear matched"):
        add_lora(tiny_model("llama"), targets=["nope"])


@pytest.mark.parametrize("damage", ["prune50", "w3"])
def test_kd_lora_recovers_a_damaged_model(damage):
    teacher = tiny_model("llama", seed=0)
    student = copy.deepcopy(teacher)
    (_prune_half if damage == "prune50" else _quantize_w3)(student)
    train = correlated_tokens(32, 64, seed=1)
    held = correlated_tokens(8, 64, seed=2)  # never trained on
    before = _kl(teacher, student, held)
    add_lora(student, r=8, alpha=16)
    frozen = {n: t.clone() for n, t in student.state_dict().items() if "lora_" not in n}
    rep = recover(student, train, teacher, RecoverConfig(steps=40, lr=3e-3, batch_size=8, warmup=2), progress=False)
    after = _kl(teacher, student, held)
    assert after < 0.6 * before, (before, after)
    assert rep.losses[-1] < rep.losses[0] and rep.tokens_per_s > 0
    for n, t in student.state_dict().items():  # the (quantized / pruned) base never moves
        if "lora_" not in n:
            assert torch.equal(t, frozen[n]), n


def test_resume_matches_uninterrupted_run(tmp_path):
    teacher = tiny_model("llama", seed=0)
    tokens = correlated_tokens(16, 32, seed=3)
    cfg = RecoverConfig(steps=8, lr=2e-3, batch_size=4, grad_accum=2, save_every=2, warmup=3)

    def fresh():
        s = copy.deepcopy(teacher)
        _prune_half(s)
        torch.manual_seed(0)
        add_lora(s, r=4, alpha=8)
        return s

    a = fresh()
    ra = recover(a, tokens, teacher, cfg, progress=False)
    b = fresh()
    ck = tmp_path / "ck"
    rb1 = recover(b, tokens, teacher, cfg, checkpoint_dir=ck, progress=False, stop_after=5)  # "killed" after 5
    assert rb1.steps == 5 and (ck / "state.json").exists()
    c = fresh()  # a new process: fresh model, state from the checkpoint (saved at step 4)
    rc = recover(c, tokens, teacher, cfg, checkpoint_dir=ck, progress=False)
    assert rc.resumed_from == 4 and rc.steps == 8
    assert rc.losses == pytest.approx(ra.losses, rel=1e-5, abs=1e-7)
    for (n, p), (_, q) in zip(a.named_parameters(), c.named_parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6, msg=n)


def test_peft_loads_our_adapter_with_same_logits(tmp_path):
    peft = pytest.importorskip("peft")
    base_dir = tmp_path / "base"
    base = tiny_model("llama", seed=0)
    base.save_pretrained(base_dir, safe_serialization=True)
    m = copy.deepcopy(base)
    add_lora(m, r=4, alpha=8, targets=["q_proj", "v_proj", "down_proj"])
    with torch.no_grad():
        for n, p in m.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.05)
    ids = correlated_tokens(2, 24)
    ours = m(input_ids=ids).logits
    out = save_adapter(m, tmp_path / "adapter", base_model=str(base_dir))
    with pytest.raises(FileExistsError):
        save_adapter(m, out)
    pm = peft.PeftModel.from_pretrained(copy.deepcopy(base), str(out))
    torch.testing.assert_close(pm(input_ids=ids).logits, ours, rtol=1e-5, atol=1e-5)
    again = copy.deepcopy(base)
    load_adapter(again, out)
    torch.testing.assert_close(again(input_ids=ids).logits, ours)


def test_merge_dense_pruned_and_quantized():
    ids = correlated_tokens(2, 24)
    for damage in ("none", "prune50", "w3"):
        m = tiny_model("llama", seed=0)
        if damage == "prune50":
            _prune_half(m)
        if damage == "w3":
            _quantize_w3(m)
        add_lora(m, r=4, alpha=8)
        with torch.no_grad():
            for n, p in m.named_parameters():
                if "lora_B" in n:
                    p.normal_(0, 0.02)
        ref = m(input_ids=ids).logits
        merge_lora(m)
        assert not any(isinstance(x, LoRALinear) for x in m.modules())
        got = m(input_ids=ids).logits
        if damage == "prune50":  # the update is masked to keep the zeros: sparsity survives, logits move a little
            q = m.model.layers[0].self_attn.q_proj.weight
            assert (q == 0).float().mean() >= 0.49
            assert float((got - ref).norm() / ref.norm()) < 0.2
        else:
            torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-4)


def test_cli_recover_adapter_and_merge(tmp_path, tiny_dir, text_file, capsys):
    import json

    import llmpress as lp
    from llmpress.cli import main

    comp = tmp_path / "w4"
    assert main(["compress", str(tiny_dir), "-r", "w4a16-rtn", "-g", "32", "-o", str(comp)]) == 0
    ad = tmp_path / "adapter"
    j = tmp_path / "r.json"
    assert main(["recover", str(comp), "--base", str(tiny_dir), "-o", str(ad), "--steps", "3", "--seqlen", "32",
                 "--batch-size", "2", "--data", str(text_file), "--json", str(j)]) == 0
    assert (ad / "adapter_config.json").exists() and (ad / "adapter_model.safetensors").exists()
    r = json.loads(j.read_text())
    assert r["steps"] == 3 and r["last_loss"] is not None
    assert main(["recover", str(comp), "--base", str(tiny_dir), "-o", str(ad), "--steps", "1"]) == 2  # exists
    assert "--overwrite" in capsys.readouterr().err
    jl = tmp_path / "d.jsonl"
    jl.write_text("\n".join(json.dumps({"instruction": "Say something", "output": "The quick brown fox jumps over the lazy dog."})
                            for _ in range(20)) + "\n{broken\n")
    assert main(["recover", str(comp), "--base", str(tiny_dir), "-o", str(tmp_path / "a2"), "--steps", "2", "--seqlen", "32",
                 "--batch-size", "2", "--data", str(jl)]) == 0
    assert main(["recover", str(comp), "--base", str(tiny_dir), "-o", str(tmp_path / "a3"), "--steps", "2", "--seqlen", "32",
                 "--batch-size", "2", "--data", str(jl), "--on-error", "raise"]) == 2
    assert "d.jsonl:21" in capsys.readouterr().err
    merged = tmp_path / "merged"
    assert main(["recover", str(comp), "--base", str(tiny_dir), "-o", str(merged), "--steps", "2", "--seqlen", "32",
                 "--batch-size", "2", "--data", str(text_file), "--merge"]) == 0
    m = lp.load(merged)
    assert m(input_ids=torch.tensor([[1, 2, 3]])).logits.isfinite().all()


def test_jsonl_formats_masks_and_malformed_lines(tmp_path, tokenizer, caplog):
    import json

    from llmpress.recover.data import DataError, pack, read_jsonl

    p = tmp_path / "d.jsonl"
    lines = [json.dumps({"instruction": "Name a fox.", "input": "", "output": "The quick brown fox."}),
             "{not json",
             json.dumps({"instruction": "Say hi", "input": "politely", "output": "Hello there, lazy dog."}),
             json.dumps({"instruction": "missing output"}),
             json.dumps({"instruction": "Compress", "output": "Quantization maps weights to a few bits."}) ]
    p.write_text("\n".join(lines * 6) + "\n")
    with pytest.raises(DataError, match=r"d.jsonl:2"):
        read_jsonl(p, tokenizer, on_error="raise")
    ex = read_jsonl(p, tokenizer)  # skips lines 2 and 4 of each copy, naming them
    assert len(ex) == 18 and "d.jsonl:2" in caplog.text and "d.jsonl:4" in caplog.text
    first = ex[0]
    prompt = tokenizer("### Instruction:\nName a fox.\n\n### Response:\n", add_special_tokens=False).input_ids
    assert first.train == [False] * len(prompt) + [True] * (len(first.ids) - len(prompt))
    assert first.ids[-1] == tokenizer.eos_token_id
    tokens, mask = pack(ex, 32)
    assert tokens.shape == mask.shape and 0 < mask.float().mean() < 1
    chat = tmp_path / "c.jsonl"
    chat.write_text(json.dumps({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}) + "\n")
    with pytest.raises(DataError, match="chat template"):
        read_jsonl(chat, tokenizer)


def test_chat_template_masks_only_assistant_turns(tokenizer, tmp_path):
    import json

    from llmpress.recover.data import read_jsonl

    tok = copy.deepcopy(tokenizer)
    tok.chat_template = ("{% for m in messages %}<s>{{ m['role'] }}: {{ m['content'] }}</s>{% endfor %}"
                         "{% if add_generation_prompt %}<s>assistant: {% endif %}")
    p = tmp_path / "c.jsonl"
    msgs = [{"role": "user", "content": "the quick fox"}, {"role": "assistant", "content": "jumps over the dog"},
            {"role": "user", "content": "and then"}, {"role": "assistant", "content": "compression keeps models small"}]
    p.write_text(json.dumps({"messages": msgs}) + "\n")
    (ex,) = read_jsonl(p, tok)
    trained = tok.decode([i for i, t in zip(ex.ids, ex.train) if t]).replace("Ġ", " ")  # (no byte-level decoder)
    assert all(w in trained for w in ("jumps", "dog", "keeps", "small"))
    assert not any(w in trained for w in ("quick", "then", "user"))


def test_masked_training_ignores_prompt_tokens():
    teacher = tiny_model("llama", seed=0)
    student = copy.deepcopy(teacher)
    _prune_half(student)
    add_lora(student, r=4, alpha=8)
    tokens = correlated_tokens(8, 32, seed=4)
    mask = torch.zeros_like(tokens, dtype=torch.bool)  # nothing to learn: the adapters must not move
    rep = recover(student, tokens, teacher, RecoverConfig(steps=3, batch_size=4, lr=1e-2), loss_mask=mask, progress=False)
    assert all(l == 0 for l in rep.losses)
    assert all(float(p.abs().sum()) == 0 for n, p in student.named_parameters() if "lora_B" in n)


def test_cli_recover_qat_full_cache_and_requant(tmp_path, tiny_dir, text_file, capsys):
    import json

    import llmpress as lp
    from llmpress.cli import main

    comp = tmp_path / "w3"
    assert main(["compress", str(tiny_dir), "-r", "w3a16-rtn", "-g", "32", "-o", str(comp)]) == 0
    common = ["--base", str(tiny_dir), "--steps", "3", "--seqlen", "32", "--batch-size", "2", "--data", str(text_file)]
    q = tmp_path / "qat"
    j = tmp_path / "q.json"
    assert main(["recover", str(comp), *common, "--method", "qat", "--learn-scales", "-o", str(q),
                 "--teacher-cache", str(tmp_path / "cache"), "--topk", "16", "--json", str(j)]) == 0
    assert (tmp_path / "cache" / "cache.json").exists()
    r = json.loads(j.read_text())
    assert r["steps"] == 3 and 0 <= r["qat"]["integers_moved"] <= 1
    back = lp.load(q)  # the integer model, as a compressed-tensors checkpoint
    assert sum(isinstance(m, QuantLinear) for m in back.modules()) == 14
    # the cache is reused (same tokens, same temperature); another temperature is refused
    assert main(["recover", str(comp), *common, "--method", "qat", "-o", str(tmp_path / "q2"),
                 "--teacher-cache", str(tmp_path / "cache")]) == 0
    assert main(["recover", str(comp), *common, "--method", "qat", "-o", str(tmp_path / "q3"),
                 "--teacher-cache", str(tmp_path / "cache"), "--temperature", "2"]) == 2
    assert "temperature" in capsys.readouterr().err
    full = tmp_path / "full"
    assert main(["recover", str(tiny_dir), *common, "--method", "full", "--hidden-weight", "1", "-o", str(full)]) == 0
    assert lp.load(full)(input_ids=torch.tensor([[1, 2, 3]])).logits.isfinite().all()
    assert main(["recover", str(comp), *common, "--method", "qat", "--merge", "-o", str(tmp_path / "x")]) == 2
    assert "--merge" in capsys.readouterr().err
    rq = tmp_path / "requant"
    assert main(["recover", str(comp), *common, "--merge", "--requant", "-o", str(rq), "--json", str(j)]) == 0
    assert sum(isinstance(m, QuantLinear) for m in lp.load(rq).modules()) == 14  # re-compressed, not dense


def test_qlora_through_a_kernel_gets_input_gradients():
    """bf16 on the CPU runs int4 / int8 layers through PyTorch's packed kernels, which have no
    derivative: the input gradient must still flow (and equal the reference path's), so QLoRA
    trains there (and on the GPU through the Triton kernels)."""
    from llmpress import kernels
    from llmpress.quant.primitives import QuantScheme
    from llmpress.quant.rtn import rtn

    torch.manual_seed(0)
    for sch in (QuantScheme(4, True, "group", 32), QuantScheme(8, True, "channel")):
        ql = QuantLinear(rtn(torch.randn(64, 128), sch))
        x = torch.randn(3, 5, 128, dtype=torch.bfloat16, requires_grad=True)
        y = ql(x)
        assert y.grad_fn is not None and "GradX" in type(y.grad_fn).__name__  # the kernel ran
        c = torch.randn(3, 5, 64)  # a linear loss: the gradient is c W whatever y's rounding
        (y.float() * c).sum().backward()
        with kernels.forced("reference"):
            x2 = x.detach().clone().requires_grad_()
            (ql(x2).float() * c).sum().backward()
        torch.testing.assert_close(x.grad.float(), x2.grad.float(), rtol=3e-2, atol=3e-2)
    teacher = tiny_model("llama", seed=0)
    student = copy.deepcopy(teacher)
    _quantize_w3(student)
    student.to(torch.bfloat16)
    add_lora(student, r=4, alpha=8)
    rep = recover(student, correlated_tokens(8, 32, seed=1), None,
                  RecoverConfig(steps=3, lr=1e-3, batch_size=4, kd="none", ce_weight=1.0, warmup=1), progress=False)
    assert len(rep.losses) == 3 and all(torch.isfinite(torch.tensor(rep.losses)))
    assert any(float(m.lora_B.weight.abs().sum()) > 0 for m in student.modules() if isinstance(m, LoRALinear))
