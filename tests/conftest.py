"""Tiny seeded models and a tiny trained tokenizer, built in-process (no downloads)."""

from __future__ import annotations

import logging

import pytest
import torch

logging.getLogger("transformers").setLevel(logging.ERROR)

TEXT = (
    "The quick brown fox jumps over the lazy dog. Compression keeps models small and fast. "
    "Quantization maps weights to a few bits; calibration data tells which errors matter. "
    "Wikipedia is a free online encyclopedia written collaboratively by volunteers. "
) * 60


def tiny_config(arch: str):
    """A 2-block config of ``arch`` with hidden 64 (group sizes 16/32/64 divide every linear)."""
    import transformers as tf

    common = dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)
    if arch == "llama":
        return tf.LlamaConfig(**common)
    if arch == "mistral":
        return tf.MistralConfig(**common, sliding_window=64)
    if arch == "qwen2":
        return tf.Qwen2Config(**common)
    if arch == "qwen3":
        return tf.Qwen3Config(**common, head_dim=16)
    if arch == "gemma":
        return tf.GemmaConfig(**common, head_dim=16)
    if arch == "gemma2":
        return tf.Gemma2Config(**common, head_dim=16, sliding_window=16)
    if arch == "gemma3":
        return tf.Gemma3TextConfig(**common, head_dim=16, sliding_window=16)
    if arch == "phi3":
        return tf.Phi3Config(**{**common, "num_key_value_heads": 4}, pad_token_id=0)
    if arch == "gpt2":
        return tf.GPT2Config(vocab_size=256, n_embd=64, n_layer=2, n_head=4, n_positions=256)
    if arch == "gpt_neox":
        return tf.GPTNeoXConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                num_attention_heads=4, max_position_embeddings=256)
    if arch == "opt":
        return tf.OPTConfig(vocab_size=256, hidden_size=64, ffn_dim=128, num_hidden_layers=2,
                            num_attention_heads=4, max_position_embeddings=256, word_embed_proj_dim=64)
    raise KeyError(arch)


ARCHS = ["llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3", "phi3", "gpt2", "gpt_neox", "opt"]


def tiny_model(arch: str = "llama", seed: int = 0):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    cfg = tiny_config(arch)
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32).eval()
    with torch.no_grad():  # larger-than-init weights so quantization error is visible
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0, 0.08)
        # Real LMs have anisotropic activations (low-rank structure, a few outlier channels);
        # give the tiny model the same, so calibration-aware methods have something to use.
        emb = model.get_input_embeddings().weight
        v, d = emb.shape
        low = torch.randn(v, 8) @ torch.randn(8, d) * 0.3 + 0.05 * torch.randn(v, d)
        low[:, :3] *= 6.0
        emb.copy_(low)
    return model


def wide_llama(tokenizer=None):
    """A 2-block Llama whose rows tile into K-quant super-blocks (hidden 256, ffn 512)."""
    import transformers as tf

    torch.manual_seed(0)
    cfg = tf.LlamaConfig(vocab_size=256, hidden_size=256, intermediate_size=512, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)
    m = tf.AutoModelForCausalLM.from_config(cfg, dtype=torch.float32).eval()
    with torch.no_grad():
        for p in m.parameters():
            if p.dim() == 2:
                p.normal_(0, 0.05)
    m.llmpress_tokenizer = tokenizer
    return m


@pytest.fixture(scope="session")
def tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(vocab_size=256, special_tokens=["<unk>", "<s>", "</s>"], show_progress=False)
    tok.train_from_iterator([TEXT], trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>")


@pytest.fixture
def text_file(tmp_path):
    p = tmp_path / "corpus.txt"
    p.write_text(TEXT)
    return p


@pytest.fixture
def tiny_dir(tmp_path, tokenizer):
    """A tiny Llama saved as a local HF directory (safetensors) with its tokenizer."""
    m = tiny_model("llama")
    d = tmp_path / "tiny-llama"
    m.save_pretrained(d, safe_serialization=True)
    tokenizer.save_pretrained(d)
    return d


def correlated_tokens(n: int, seqlen: int, vocab: int = 256, seed: int = 0) -> torch.Tensor:
    """Token streams with strong local structure (a noisy cycle), so activations correlate."""
    g = torch.Generator().manual_seed(seed)
    start = torch.randint(0, vocab, (n, 1), generator=g)
    steps = torch.randint(1, 4, (n, seqlen), generator=g).cumsum(1)
    return (start + steps) % vocab
