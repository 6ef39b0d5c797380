"""A decode runtime for any causal LM that transformers builds: a static KV cache, the whole
decode step (forward, sampling, cache and position bookkeeping) captured once as a CUDA graph and
replayed per token, and speculative decoding with a draft model.

The model itself is the plain transformers module (with llmpress' compressed linears, whose
forward picks the Triton kernels on the GPU). What the runtime adds is what eager generate
spends its time on at batch 1: Python and kernel-launch overhead. The step reads its inputs
from fixed buffers (token, position) and writes the next token back into them, so a replay needs
no host work at all; the host only checks for an end token every ``check_every`` steps.

Attention masks are built inside the step from the position tensor, as additive float masks
over the whole static cache (so eager and SDPA attention both take them; sliding-window layers
get their window). On the CPU, or with ``cuda_graph=False``, the same step runs eagerly.
"""

from __future__ import annotations

import copy
import logging
import time
from dataclasses import dataclass, field

import torch
from torch import nn

log = logging.getLogger(__name__)


@dataclass
class GenerationStats:
    prompt_tokens: int = 0
    new_tokens: int = 0
    prefill_s: float = 0.0
    decode_s: float = 0.0
    ttft_s: float = 0.0
    peak_mem_mb: float | None = None
    cuda_graph: bool = False
    accepted_per_step: float | None = None  # speculative decoding: target tokens per target forward
    extra: dict = field(default_factory=dict)

    @property
    def prefill_tps(self) -> float:
        return self.prompt_tokens / self.prefill_s if self.prefill_s else float("nan")

    @property
    def decode_tps(self) -> float:
        return self.new_tokens / self.decode_s if self.decode_s else float("nan")

    def as_dict(self) -> dict:
        d = {k: getattr(self, k) for k in ("prompt_tokens", "new_tokens", "prefill_s", "decode_s", "ttft_s",
                                           "peak_mem_mb", "cuda_graph", "accepted_per_step")}
        d.update(prefill_tokens_per_s=self.prefill_tps, decode_tokens_per_s=self.decode_tps, **self.extra)
        return d


def _sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


class Runtime:
    """Static-cache decoding for one model at batch 1.

    >>> rt = Runtime(model, max_len=2048)
    >>> ids, stats = rt.generate(prompt_ids, max_new_tokens=128)            # greedy
    >>> ids, stats = rt.generate(prompt_ids, 128, temperature=0.7, top_k=50)  # sampled in the graph

    ``fuse`` (default: on a GPU) stacks each block's q/k/v and gate/up projections into one
    matmul each, in place on ``model`` (:mod:`llmpress.fuse`; names, state dict and outputs
    unchanged); ``llmpress.fuse.unfuse_projections(model)`` undoes it.
    """

    def __init__(self, model: nn.Module, max_len: int = 2048, cuda_graph: bool | None = None,
                 compile: bool = False, fuse: bool | None = None) -> None:
        from transformers import StaticCache

        self.model = model.eval()
        p = next(model.parameters())
        # q/k/v and gate/up as one matmul each (llmpress.fuse; default on a GPU, where each
        # projection's launch and tail cost is a large share of a batch-1 GEMV)
        if fuse if fuse is not None else p.device.type == "cuda":
            from llmpress.fuse import fuse_projections

            fuse_projections(self.model, p.dtype)
        # the decode step's forward through torch.compile (its norms, rotary embedding and
        # activations fused into a few kernels; the quantized matmuls stay our own kernels,
        # opaque to the compiler); prefill keeps the eager model (prompts vary in length)
        self._step_model = self.model
        if compile:
            from llmpress.kernels import make_opaque

            make_opaque(self.model)
            self._step_model = torch.compile(self.model, dynamic=False, fullgraph=False)
        self.device, self.dtype = p.device, p.dtype
        self.max_len = int(max_len)
        cfg = model.config.get_text_config(decoder=True) if hasattr(model.config, "get_text_config") else model.config
        self.window = getattr(cfg, "sliding_window", None)
        types = list(getattr(cfg, "layer_types", None) or [])
        if not types:
            types = ["sliding_attention" if self.window else "full_attention"] * cfg.num_hidden_layers
        self.mask_types = sorted(set(types))
        if self.window is not None and self.window >= self.max_len:
            self.window = None
        # every layer keeps the whole sequence (one mask shape); windows are applied by the mask
        cache_cfg = copy.deepcopy(cfg)
        if getattr(cache_cfg, "layer_types", None):
            cache_cfg.layer_types = ["full_attention"] * len(cache_cfg.layer_types)
        if hasattr(cache_cfg, "sliding_window"):
            cache_cfg.sliding_window = None
        self.cache = StaticCache(config=cache_cfg, max_cache_len=self.max_len)
        self.cuda_graph = (self.device.type == "cuda") if cuda_graph is None else (cuda_graph and self.device.type == "cuda")
        self._kv = torch.arange(self.max_len, device=self.device)
        self._tok = torch.zeros(1, 1, dtype=torch.long, device=self.device)
        self._pos = torch.zeros(1, 1, dtype=torch.long, device=self.device)
        self._temp = torch.ones((), device=self.device)
        self._graphs: dict = {}
        self._minval = torch.finfo(self.dtype).min

    # -- building blocks -------------------------------------------------------------------------
    def _mask(self, q_pos: torch.Tensor):
        """Additive mask [1, 1, q, max_len] (or one per layer type) for queries at ``q_pos`` [q]."""
        q = q_pos.reshape(-1, 1)
        allowed = self._kv.reshape(1, -1) <= q
        full = torch.where(allowed, 0.0, self._minval).to(self.dtype)[None, None]
        if self.window is None:
            masks = {t: full for t in self.mask_types}
        else:
            sw = allowed & (self._kv.reshape(1, -1) > q - self.window)
            sliding = torch.where(sw, 0.0, self._minval).to(self.dtype)[None, None]
            masks = {t: (sliding if t == "sliding_attention" else full) for t in self.mask_types}
        return next(iter(masks.values())) if len(masks) == 1 else masks

    def _set_length(self, n: int) -> None:
        """Point every cache layer's write position at ``n`` (prefill start, speculative rollback)."""
        for layer in self.cache.layers:
            cl = getattr(layer, "cumulative_length", None)
            if isinstance(cl, torch.Tensor):
                cl.fill_(n)
            elif cl is not None:
                layer.cumulative_length = n

    def _forward(self, ids: torch.Tensor, pos: torch.Tensor, keep: int = 1, model: nn.Module | None = None) -> torch.Tensor:
        """Logits [1, T', V] of ``ids`` [1, T] at positions ``pos`` [1, T], appending to the cache;
        only the last ``keep`` positions' logits (all with 0)."""
        fwd = self.model if model is None else model
        out = fwd(input_ids=ids, position_ids=pos, attention_mask=self._mask(pos[0]),
                  past_key_values=self.cache, use_cache=True, logits_to_keep=keep)
        return out.logits

    def _sample(self, logits: torch.Tensor, top_k: int | None, top_p: float | None, greedy: bool) -> torch.Tensor:
        """Next token [1, 1] from logits [1, V]: argmax, or a Gumbel-max draw after temperature,
        top-k and top-p filtering (tensor ops only, so it is captured with the step)."""
        if greedy:
            return logits.argmax(-1, keepdim=True)
        x = logits.float() / self._temp
        if top_k:
            kth = torch.topk(x, top_k, dim=-1).values[..., -1:]
            x = x.masked_fill(x < kth, float("-inf"))
        if top_p is not None and top_p < 1.0:
            srt, idx = torch.sort(x, dim=-1, descending=True)
            prob = srt.softmax(-1)
            drop = (prob.cumsum(-1) - prob) > top_p  # keep the smallest prefix whose mass reaches top_p
            x = x.scatter(-1, idx, srt.masked_fill(drop, float("-inf")))
        g = -torch.log(-torch.log(torch.rand_like(x).clamp_(1e-20, 1.0)))
        return (x + g).argmax(-1, keepdim=True)

    def _step(self, top_k, top_p, greedy) -> None:
        logits = self._forward(self._tok, self._pos, model=self._step_model)[:, -1]
        self._tok.copy_(self._sample(logits, top_k, top_p, greedy))
        self._pos.add_(1)

    def _decode_fn(self, top_k, top_p, greedy):
        key = (top_k, top_p, greedy)
        if not self.cuda_graph:
            return lambda: self._step(*key)
        if key not in self._graphs:
            s = torch.cuda.Stream(self.device)
            s.wait_stream(torch.cuda.current_stream(self.device))
            state = (self._tok.clone(), self._pos.clone())
            with torch.cuda.stream(s):  # warm-up: autotuning, lazy packing, allocator pools
                for _ in range(2):
                    self._step(*key)
            torch.cuda.current_stream(self.device).wait_stream(s)
            g = torch.cuda.CUDAGraph()
            with torch.cuda.graph(g):
                self._step(*key)
            self._graphs[key] = g
            # the warm-up moved token, position and cache length: back to where generate left them
            self._tok.copy_(state[0])
            self._pos.copy_(state[1])
            self._set_length(int(state[1]))
        return self._graphs[key].replay

    # -- public ------------------------------------------------------------------------------------
    @torch.inference_mode()
    def generate(self, input_ids: torch.Tensor, max_new_tokens: int = 128, *, temperature: float = 0.0,
                 top_k: int | None = None, top_p: float | None = None, eos_token_id: int | list[int] | None = None,
                 seed: int | None = None, check_every: int = 16) -> tuple[torch.Tensor, GenerationStats]:
        """Prompt ``input_ids`` [1, T] (or [T]) plus up to ``max_new_tokens`` tokens, and timings.
        temperature 0 is greedy."""
        ids = input_ids.reshape(1, -1).to(self.device)
        t = ids.shape[1]
        if t + max_new_tokens > self.max_len:
            raise ValueError(f"prompt ({t}) + max_new_tokens ({max_new_tokens}) exceeds max_len={self.max_len}")
        if seed is not None:
            torch.manual_seed(seed)
        greedy = temperature <= 0
        self._temp.fill_(max(temperature, 1e-6))
        eos = set([eos_token_id] if isinstance(eos_token_id, int) else (eos_token_id or []))
        st = GenerationStats(prompt_tokens=t, cuda_graph=self.cuda_graph)
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        _sync(self.device)
        t0 = time.perf_counter()
        self._set_length(0)
        pos = torch.arange(t, device=self.device).reshape(1, -1)
        logits = self._forward(ids, pos)[:, -1]
        first = self._sample(logits, top_k, top_p, greedy)
        _sync(self.device)
        st.prefill_s = st.ttft_s = time.perf_counter() - t0
        self._tok.copy_(first)
        self._pos.fill_(t)
        out = torch.empty(1, max_new_tokens, dtype=torch.long, device=self.device)
        out[:, 0] = first[:, 0]
        n = 1
        step = self._decode_fn(top_k, top_p, greedy)  # builds (and warms) the graph outside the timing
        _sync(self.device)
        t1 = time.perf_counter()
        done = bool(eos) and int(first) in eos
        while n < max_new_tokens and not done:
            chunk = min(check_every, max_new_tokens - n)
            for i in range(chunk):
                step()
                out[:, n + i] = self._tok[:, 0]
            if eos:
                hits = [j for j, v in enumerate(out[0, n:n + chunk].tolist()) if v in eos]
                if hits:
                    n += hits[0] + 1
                    break
            n += chunk
        _sync(self.device)
        st.decode_s = time.perf_counter() - t1
        st.new_tokens = n - 1  # tokens made by decode steps (the first came from prefill)
        if self.device.type == "cuda":
            st.peak_mem_mb = torch.cuda.max_memory_allocated(self.device) / 2**20
        return torch.cat([ids, out[:, :n]], 1), st


class SpeculativeRuntime:
    """Greedy speculative decoding: a draft proposes ``k`` tokens one at a time, the target checks
    them in one forward of k + 1 tokens and keeps the longest agreeing prefix plus its own next
    token. The output is the target's greedy output (up to floating-point ties between the
    batched check and one-token steps); both caches roll back by moving their write position."""

    def __init__(self, target: nn.Module, draft: nn.Module, k: int = 4, max_len: int = 2048,
                 cuda_graph: bool | None = None) -> None:
        if target.config.vocab_size != draft.config.vocab_size:
            raise ValueError(f"draft vocabulary ({draft.config.vocab_size}) differs from the target's "
                             f"({target.config.vocab_size}); the two must share a tokenizer")
        self.k = int(k)
        self.t = Runtime(target, max_len + k + 1, cuda_graph=False)
        self.d = Runtime(draft, max_len + k + 1, cuda_graph=cuda_graph)
        self.max_len = max_len

    @torch.inference_mode()
    def generate(self, input_ids: torch.Tensor, max_new_tokens: int = 128,
                 eos_token_id: int | list[int] | None = None) -> tuple[torch.Tensor, GenerationStats]:
        t, d = self.t, self.d
        ids = input_ids.reshape(1, -1).to(t.device)
        n0 = ids.shape[1]
        if n0 + max_new_tokens > self.max_len:
            raise ValueError(f"prompt ({n0}) + max_new_tokens ({max_new_tokens}) exceeds max_len={self.max_len}")
        eos = set([eos_token_id] if isinstance(eos_token_id, int) else (eos_token_id or []))
        st = GenerationStats(prompt_tokens=n0, cuda_graph=d.cuda_graph)
        _sync(t.device)
        t0 = time.perf_counter()
        t._set_length(0)
        d._set_length(0)
        pos = torch.arange(n0, device=t.device).reshape(1, -1)
        nxt = t._forward(ids, pos)[:, -1].argmax(-1, keepdim=True)
        d._forward(ids.to(d.device), pos.to(d.device))
        _sync(t.device)
        st.prefill_s = st.ttft_s = time.perf_counter() - t0
        seq = [int(nxt)]
        draft_step = d._decode_fn(None, None, True)
        t1 = time.perf_counter()
        forwards = 0
        d_seen = n0  # positions [0, d_seen) hold valid draft keys / values
        while len(seq) < max_new_tokens and not (eos and seq[-1] in eos):
            cur = n0 + len(seq) - 1  # position of the last accepted token (in neither cache yet)
            props = []
            if d_seen < cur and not d.cuda_graph:
                # the draft missed the last proposal (all were accepted): it and the last token
                # in one forward, which costs about one step on a memory-bound CPU
                d._set_length(d_seen)
                back = torch.tensor([seq[d_seen - n0: cur - n0 + 1]], device=d.device)
                pos = torch.arange(d_seen, cur + 1, device=d.device).reshape(1, -1)
                d._tok.copy_(d._forward(back, pos)[:, -1].argmax(-1, keepdim=True))
                d._pos.fill_(cur + 1)
                props.append(d._tok.clone())
            else:
                for p in range(d_seen, cur):  # one graph step per missed token
                    d._set_length(p)
                    d._tok.fill_(seq[p - n0])
                    d._pos.fill_(p)
                    draft_step()
                d._set_length(cur)
                d._tok.fill_(seq[-1])
                d._pos.fill_(cur)
            while len(props) < self.k:
                draft_step()
                props.append(d._tok.clone())
            prop = torch.cat(props, 1).to(t.device)  # [1, k]
            chunk = torch.cat([torch.tensor([[seq[-1]]], device=t.device), prop], 1)
            t._set_length(cur)
            logits = t._forward(chunk, torch.arange(cur, cur + self.k + 1, device=t.device).reshape(1, -1), keep=0)
            forwards += 1
            best = logits[0].argmax(-1)  # the target's choice after each prefix
            agree = (best[: self.k] == prop[0]).tolist()
            acc = 0
            while acc < self.k and agree[acc]:
                acc += 1
            d_seen = cur + min(acc, self.k - 1) + 1
            for tok in prop[0, :acc].tolist() + [int(best[acc])]:
                seq.append(tok)
                if (eos and tok in eos) or len(seq) >= max_new_tokens:
                    break
        _sync(t.device)
        st.decode_s = time.perf_counter() - t1
        st.new_tokens = len(seq) - 1
        st.accepted_per_step = st.new_tokens / max(forwards, 1)
        out = torch.tensor([seq], device=ids.device)
        return torch.cat([ids, out], 1), st
