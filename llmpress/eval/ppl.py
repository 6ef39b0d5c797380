"""Perplexity, KL(base || model) and top-1 agreement under the pinned protocol (DESIGN.md §4):
the evaluation text tokenized whole, the first N x L tokens in non-overlapping windows, each
window scoring positions 1..L-1; ppl = exp(mean NLL); KL and top-1 computed window by window."""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from llmpress import data
from llmpress.nn import CompressedLinear
from llmpress.quant.kvcache import KVScheme, QuantizedKVCache


@dataclass
class EvalResult:
    ppl: float
    nll: float
    kl: float | None
    top1: float | None
    tokens: int
    eval_seconds: float
    size_mb: float
    bits_per_weight: float | None  # over the quantized linear weights (with scales/zeros)
    params: int

    def to_dict(self) -> dict:
        return asdict(self)


def model_size(model: nn.Module, path: str | Path | None = None) -> tuple[float, float | None, int]:
    """(size in MB, effective bits per quantized weight or None, parameter count). With
    ``path``, the size is the bytes of its *.safetensors files on disk."""
    from llmpress.formats import layout_for

    qbits = qn = 0
    params = 0
    for m in model.modules():
        if isinstance(m, CompressedLinear):
            n = m.out_features * m.in_features
            qbits += m.qweight.storage_bits()
            qn += n
            params += n
    params += sum(p.numel() for p in model.parameters())  # shared (tied) parameters once
    if path is not None:
        size = sum(f.stat().st_size for f in Path(path).glob("*.safetensors"))
    else:
        size = sum(t.numel() * t.element_size() for t in layout_for(model).state_dict(model).values())
    return size / 1e6, (qbits / qn if qn else None), params


def _window_logprobs(model: nn.Module, ids: torch.Tensor, device: torch.device, kv: KVScheme | None = None) -> torch.Tensor:
    if kv is None:
        out = model(input_ids=ids[None].to(device), use_cache=False).logits[0, :-1]  # [L-1, V]
    else:  # attention reads keys/values rounded as they enter the cache, as in generation
        cache = QuantizedKVCache(kv, config=model.config)
        out = model(input_ids=ids[None].to(device), past_key_values=cache, use_cache=True).logits[0, :-1]
    return F.log_softmax(out.float(), dim=-1)


@torch.inference_mode()
def evaluate_many(
    models: dict[str, nn.Module],
    base: nn.Module | None = None,
    *,
    tokenizer=None,
    source: str = "wiki",
    seqlen: int = 1024,
    n_windows: int = 24,
    device: str | torch.device = "cpu",
    paths: dict[str, str | Path] | None = None,
    progress: bool = True,
    kv_cache: dict[str, KVScheme] | None = None,
) -> dict[str, EvalResult]:
    """Evaluate several models on the same windows; base log-probs are computed once a window.
    ``kv_cache`` maps a model's key to a KV-cache quantization scheme applied while it runs
    (the same model object may appear under several keys)."""
    kv_cache = kv_cache or {}
    device = torch.device(device)
    first = next(iter(models.values()))
    tok = tokenizer or getattr(first, "llmpress_tokenizer", None) or getattr(base, "llmpress_tokenizer", None)
    if tok is None:
        raise ValueError("no tokenizer: load the model with llmpress.load or pass tokenizer=")
    windows = data.eval_windows(tok, source, seqlen, n_windows)
    acc = {k: dict(nll=0.0, kl=0.0, top1=0, t=0.0) for k in models}
    n_tok = 0
    for w in tqdm(windows, desc="eval", unit="window", disable=not progress):
        tgt = w[1:].to(device)
        b = _window_logprobs(base, w, device) if base is not None else None
        n_tok += tgt.numel()
        for k, m in models.items():
            t0 = time.perf_counter()
            kv = kv_cache.get(k)
            lp = b if (m is base and kv is None) else _window_logprobs(m, w, device, kv)  # base row: reuse
            a = acc[k]
            a["nll"] += float(-lp.gather(1, tgt[:, None]).sum())
            if b is not None:
                a["kl"] += float((b.exp() * (b - lp)).sum())
                a["top1"] += int((b.argmax(-1) == lp.argmax(-1)).sum())
            a["t"] += time.perf_counter() - t0
    res = {}
    for k, m in models.items():
        a = acc[k]
        size, bpw, params = model_size(m, (paths or {}).get(k))
        nll = a["nll"] / n_tok
        res[k] = EvalResult(
            ppl=math.exp(nll), nll=nll,
            kl=a["kl"] / n_tok if base is not None else None,
            top1=a["top1"] / n_tok if base is not None else None,
            tokens=n_tok, eval_seconds=a["t"], size_mb=size, bits_per_weight=bpw, params=params,
        )
    return res


def evaluate(model: nn.Module, base: nn.Module | None = None, **kw) -> EvalResult:
    """Perplexity of ``model`` and, with ``base``, KL(base || model) and top-1 agreement."""
    return evaluate_many({"model": model}, base, **kw)["model"]
