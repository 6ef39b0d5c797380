"""Smoke check of ``llmpress recover --device cuda`` (LoRA / QLoRA, QAT, full) on a tiny seeded
Llama with its own tokenizer: the commands run on the GPU and their outputs load back.

  python bench/recover_cli_gpu_check.py
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
from pathlib import Path

# bench/ off the import path: its kernels.py would shadow the `kernels` package that transformers imports
sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") != os.path.dirname(os.path.abspath(__file__))]

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main() -> None:
    import transformers as tf
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    import llmpress as lp
    from llmpress.cli import main as cli

    text = ("The quick brown fox jumps over the lazy dog. Compression keeps models small and fast. "
            "Quantization maps weights to a few bits; calibration data tells which errors matter. ") * 200
    d = Path(tempfile.mkdtemp())
    (d / "corpus.txt").write_text(text)
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.train_from_iterator([text], trainers.BpeTrainer(vocab_size=256, special_tokens=["<unk>", "<s>", "</s>"]))
    fast = tf.PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>")
    torch.manual_seed(0)
    cfg = tf.LlamaConfig(vocab_size=256, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)
    m = tf.AutoModelForCausalLM.from_config(cfg)
    m.save_pretrained(d / "base")
    fast.save_pretrained(d / "base")
    assert cli(["compress", str(d / "base"), "-r", "w4a16-rtn", "-g", "32", "-o", str(d / "w4")]) == 0
    common = ["--base", str(d / "base"), "--steps", "4", "--seqlen", "32", "--batch-size", "2",
              "--data", str(d / "corpus.txt"), "--device", "cuda"]
    results = {}
    for method, extra in (("lora", []), ("qat", ["--learn-scales"]), ("full", ["--hidden-weight", "1"])):
        src = d / ("base" if method == "full" else "w4")
        out = d / method
        j = d / f"{method}.json"
        rc = cli(["recover", str(src), *common, "--method", method, "-o", str(out), "--json", str(j), *extra])
        r = json.loads(j.read_text()) if j.exists() else {}
        if method == "lora":
            ok = (out / "adapter_model.safetensors").exists()
        else:
            back = lp.load(out)
            ok = bool(back(input_ids=torch.tensor([[1, 2, 3]])).logits.isfinite().all())
        results[method] = dict(rc=rc, ok=ok, first_loss=r.get("first_loss"), last_loss=r.get("last_loss"),
                               device=r.get("device"))
        print(method, results[method], flush=True)
    assert all(v["rc"] == 0 and v["ok"] for v in results.values()), results
    print("recover --device cuda: all OK")


if __name__ == "__main__":
    main()
