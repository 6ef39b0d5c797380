"""Teacher logits cached on disk (top-k + rest), full distillation into a smaller student and
hidden-state matching."""

from __future__ import annotations

import copy

import pytest
import torch

from conftest import correlated_tokens, tiny_model
from llmpress.recover import (
    RecoverConfig, TeacherCache, cache_teacher, hidden_loss, kd_loss, kd_loss_topk, layer_map, recover,
)


def _topk(logits, k, t):
    v, i = logits.topk(k, -1)
    return v, i, torch.logsumexp(logits / t, -1)


@pytest.mark.parametrize("mode", ["forward", "reverse"])
def test_topk_kd_is_exact_at_full_vocab_and_a_lower_bound_below(mode):
    g = torch.Generator().manual_seed(0)
    s, t = torch.randn(3, 7, 50, generator=g) * 3, torch.randn(3, 7, 50, generator=g) * 3
    mask = torch.rand(3, 7, generator=g) > 0.3
    for temp in (1.0, 2.0):
        full = kd_loss(s, t, temp, mode, mask)
        torch.testing.assert_close(kd_loss_topk(s, *_topk(t, 50, temp), temp, mode, mask), full, rtol=1e-4, atol=1e-6)
        part = [float(kd_loss_topk(s, *_topk(t, k, temp), temp, mode, mask)) for k in (1, 5, 20, 50)]
        assert all(0 <= a <= b + 1e-6 for a, b in zip(part, part[1:])), part  # coarser -> smaller KL
        assert part[-1] == pytest.approx(float(full), rel=1e-4)


def test_cached_teacher_trains_like_the_live_one_and_checks_its_data(tmp_path):
    teacher = tiny_model("llama", seed=0)
    tokens = correlated_tokens(12, 32, seed=1)
    cache = cache_teacher(teacher, tokens, tmp_path / "c", k=256, batch_size=5, rows_per_chunk=5, progress=False)
    assert len(list((tmp_path / "c").glob("chunk-*.safetensors"))) == 3
    rows = torch.tensor([11, 0, 6])
    v, i, lse = cache.get(rows)
    with torch.no_grad():
        ref = teacher(input_ids=tokens[rows]).logits
    torch.testing.assert_close(v, ref.topk(256, -1).values)
    torch.testing.assert_close(lse, torch.logsumexp(ref, -1))
    cfg = RecoverConfig(steps=4, lr=2e-3, batch_size=4, warmup=1, train="full")

    def run(t):
        s = tiny_model("llama", seed=1)
        return recover(s, tokens, t, cfg, progress=False).losses

    assert run(TeacherCache(tmp_path / "c")) == pytest.approx(run(teacher), rel=1e-4, abs=1e-6)
    with pytest.raises(ValueError, match="other training tokens"):
        recover(tiny_model("llama", seed=1), tokens[:8], cache, cfg, progress=False)
    with pytest.raises(ValueError, match="temperature"):
        recover(tiny_model("llama", seed=1), tokens, cache, RecoverConfig(steps=1, batch_size=4, train="full",
                                                                          temperature=2.0), progress=False)
    with pytest.raises(FileExistsError):
        cache_teacher(teacher, tokens, tmp_path / "c", progress=False)
    with pytest.raises(FileNotFoundError, match="cache.json"):
        TeacherCache(tmp_path)


def _deep(seed=0, layers=4):
    import transformers as tf

    torch.manual_seed(seed)
    cfg = tf.LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=layers,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)
    m = tf.AutoModelForCausalLM.from_config(cfg, dtype=torch.float32).eval()
    ref = tiny_model("llama", seed=seed)  # same anisotropic init as the other tests
    with torch.no_grad():
        for p in m.parameters():
            if p.dim() == 2:
                p.normal_(0, 0.08)
        m.get_input_embeddings().weight.copy_(ref.get_input_embeddings().weight)
    return m


def test_full_distillation_into_a_block_pruned_student_with_hidden_states():
    from llmpress.prune.structured import drop_blocks

    teacher = _deep()
    train, held = correlated_tokens(32, 48, seed=1), correlated_tokens(8, 48, seed=2)
    student = copy.deepcopy(teacher)
    drop_blocks(student, [1])
    assert student.config.llmpress_kept_blocks == [0, 2, 3]
    assert layer_map(student, teacher, RecoverConfig()) == [0, 2, 3]
    twice = copy.deepcopy(student)
    drop_blocks(twice, [2])  # removals compose in the original numbering
    assert twice.config.llmpress_kept_blocks == [0, 2]
    with torch.no_grad():
        before = float(kd_loss(student(input_ids=held).logits, teacher(input_ids=held).logits))
        so, to = (m(input_ids=held, output_hidden_states=True) for m in (student, teacher))
        h0 = float(hidden_loss(so.hidden_states, to.hidden_states, [0, 2, 3]))
    assert h0 > 0
    rep = recover(student, train, teacher, RecoverConfig(steps=30, lr=2e-3, batch_size=8, warmup=2, train="full",
                                                         hidden_weight=1.0), progress=False)
    with torch.no_grad():
        after = float(kd_loss(student(input_ids=held).logits, teacher(input_ids=held).logits))
        so = student(input_ids=held, output_hidden_states=True)
        h1 = float(hidden_loss(so.hidden_states, to.hidden_states, [0, 2, 3]))
    assert after < 0.5 * before and h1 < h0, (before, after, h0, h1)
    assert rep.losses[-1] < rep.losses[0]
    assert all(p.requires_grad is False for p in student.parameters())  # handed back frozen


def test_layer_map_rules_and_errors():
    t = _deep(layers=4)
    s = _deep(layers=2)
    assert layer_map(s, t, RecoverConfig()) == [1, 3]  # evenly spaced
    assert layer_map(t, t, RecoverConfig()) == [0, 1, 2, 3]
    assert layer_map(s, t, RecoverConfig(layer_map=[0, 3])) == [0, 3]
    for bad in ([0], [3, 1], [0, 4]):
        with pytest.raises(ValueError, match="layer_map"):
            layer_map(s, t, RecoverConfig(layer_map=bad))
    with pytest.raises(ValueError, match="hidden_weight"):
        RecoverConfig(hidden_weight=-1)
    with pytest.raises(ValueError, match="train="):
        RecoverConfig(train="everything")


@pytest.mark.parametrize("teacher_kind", ["live", "cached", "ce"])
def test_chunked_logits_give_the_same_training(tmp_path, teacher_kind):
    """Computing the logits 16 tokens at a time (inside activation checkpoints) must train exactly
    like computing them whole, with a live teacher, a cached one, and the causal-LM loss."""
    from llmpress.recover.train import _head_split

    teacher = tiny_model("llama", seed=0)
    assert _head_split(teacher) is not None
    tokens = correlated_tokens(8, 48, seed=1)
    mask = torch.rand(8, 48, generator=torch.Generator().manual_seed(0)) > 0.3
    t = cache_teacher(teacher, tokens, tmp_path / "c", k=32, progress=False) if teacher_kind == "cached" else teacher
    extra = dict(kd="none", ce_weight=1.0) if teacher_kind == "ce" else dict(ce_weight=0.5)
    runs = []
    for chunk in (0, 16):
        s = tiny_model("llama", seed=1)
        cfg = RecoverConfig(steps=3, lr=2e-3, batch_size=4, warmup=1, train="full", loss_chunk=chunk, **extra)
        runs.append((recover(s, tokens, None if teacher_kind == "ce" else t, cfg, progress=False, loss_mask=mask).losses,
                     s.model.layers[0].mlp.down_proj.weight.clone()))
    assert runs[0][0] == pytest.approx(runs[1][0], rel=1e-5)
    torch.testing.assert_close(runs[0][1], runs[1][1], rtol=1e-4, atol=1e-6)


def test_soft_capped_logits_are_not_split():
    from llmpress.recover.train import _head_split

    m = tiny_model("gemma2")  # final_logit_softcapping: logits != head(decoder(x))
    m.config.final_logit_softcapping = 0.5
    assert _head_split(m) is None
