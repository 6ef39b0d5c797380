"""Statistics the calibration pass collects with forward hooks, one class per kind. Each
takes the layer input ``x`` [..., K] batch by batch (``update``) and returns the statistic
(``result``). A method names the ones it needs in ``llmpress.calibrate.SOLVERS``.

Every statistic is a mean, a maximum or a sample over calibration rows, so shares computed
on different samples combine exactly: ``merge`` folds in another share, ``all_reduce``
combines the shares of every process of a ``torch.distributed`` group (the seam a multi-GPU
calibration uses: each process runs the block on its share of the samples)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch


@contextlib.contextmanager
def _tf32(on: bool) -> Iterator[None]:
    """TensorFloat-32 matmuls while ``on``. Lossless for inputs that were bf16/fp16 (their
    mantissas fit TF32's 10 bits; products accumulate in float32) and several times faster than
    full float32 on tensor-core GPUs: the Hessian of a 14336-wide layer over 262k tokens is
    ~10^14 multiply-adds."""
    if not on:
        yield
        return
    old = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = True
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32 = old


_MM_OUT_DTYPE = [True]  # torch.mm(..., out_dtype=float32) for 16-bit CUDA inputs, until it fails once


class _HessianStat:
    """Running ``H = 2/n sum x x^T`` over the rows of a linear layer's input."""

    def __init__(self, k: int, device: torch.device) -> None:
        self.h = torch.zeros(k, k, dtype=torch.float32, device=device)
        self.n = 0

    def update(self, x: torch.Tensor) -> None:
        half = x.dtype in (torch.bfloat16, torch.float16)
        x = x.reshape(-1, x.shape[-1])  # [B, S, K] -> [B*S, K]
        m = x.shape[0]
        self.h.mul_(self.n / (self.n + m))
        if x.is_cuda and half and _MM_OUT_DTYPE[0]:
            try:  # 16-bit tensor cores, float32 accumulation and result: exact products, twice TF32's speed
                self.h.add_(torch.mm(x.t(), x, out_dtype=torch.float32), alpha=2.0 / (self.n + m))
                self.n += m
                return
            except (RuntimeError, TypeError):
                _MM_OUT_DTYPE[0] = False
        x = x.float()
        with _tf32(x.is_cuda and half):
            self.h.addmm_(x.t(), x, alpha=2.0 / (self.n + m))
        self.n += m

    def result(self) -> torch.Tensor:
        return self.h

    def merge(self, other: _HessianStat) -> None:
        """Fold in the statistic of other samples (another process's share)."""
        _merge_mean(self, "h", other.h, other.n)

    def all_reduce(self, group=None) -> None:
        _all_reduce_mean(self, "h", group)


def _merge_mean(st, attr: str, other: torch.Tensor, n: int) -> None:
    total = st.n + n
    if total:
        cur = getattr(st, attr)
        cur.mul_(st.n / total).add_(other.to(cur.device), alpha=n / total)
    st.n = total


def _all_reduce_mean(st, attr: str, group) -> None:
    """Mean over every process's samples: sum of (mean x count) and of counts."""
    import torch.distributed as dist

    cur = getattr(st, attr)
    n = torch.tensor([float(st.n)], dtype=torch.float64, device=cur.device)
    cur.mul_(st.n)
    dist.all_reduce(cur, group=group)
    dist.all_reduce(n, group=group)
    st.n = int(n.item())
    if st.n:
        cur.div_(st.n)


class _ChannelMeanStat:
    """Running mean of ``fn(x)`` per input channel."""

    fn = staticmethod(torch.abs)

    def __init__(self, k: int, device: torch.device) -> None:
        self.s = torch.zeros(k, dtype=torch.float32, device=device)
        self.n = 0

    def update(self, x: torch.Tensor) -> None:
        x = x.reshape(-1, x.shape[-1]).float()  # [B, S, K] -> [B*S, K]
        m = x.shape[0]
        self.s.mul_(self.n / (self.n + m)).add_(self.fn(x).sum(0), alpha=1.0 / (self.n + m))
        self.n += m

    def result(self) -> torch.Tensor:
        return self.s

    def merge(self, other: _ChannelMeanStat) -> None:
        _merge_mean(self, "s", other.s, other.n)

    def all_reduce(self, group=None) -> None:
        _all_reduce_mean(self, "s", group)


class _AbsMeanStat(_ChannelMeanStat):
    """Running mean of ``|x|`` per input channel (AWQ's activation salience)."""

    fn = staticmethod(torch.abs)


class _SqNormStat(_ChannelMeanStat):
    """Running mean of ``x^2`` per input channel (Wanda's squared activation norms)."""

    fn = staticmethod(torch.square)


class _AbsMaxStat:
    """Largest ``|x|`` per input channel (SmoothQuant's outliers; static activation scales)."""

    def __init__(self, k: int, device: torch.device) -> None:
        self.m = torch.zeros(k, dtype=torch.float32, device=device)

    def update(self, x: torch.Tensor) -> None:
        torch.maximum(self.m, x.reshape(-1, x.shape[-1]).abs().amax(0).float(), out=self.m)

    def result(self) -> torch.Tensor:
        return self.m

    def merge(self, other: _AbsMaxStat) -> None:
        torch.maximum(self.m, other.m.to(self.m.device), out=self.m)

    def all_reduce(self, group=None) -> None:
        import torch.distributed as dist

        dist.all_reduce(self.m, op=dist.ReduceOp.MAX, group=group)


class _SampleStat:
    """A fixed-seed subsample of input rows (up to ``cap``), for searches that need the
    activations themselves (SmoothQuant's alpha: the error of quantized activations)."""

    def __init__(self, k: int, device: torch.device, per_batch: int = 32, cap: int = 512) -> None:
        self.rows: list[torch.Tensor] = []
        self.per_batch, self.cap, self.n = per_batch, cap, 0
        self.g = torch.Generator().manual_seed(0)

    def update(self, x: torch.Tensor) -> None:
        if self.n >= self.cap:
            return
        x = x.reshape(-1, x.shape[-1])  # [B, S, K] -> [B*S, K]
        idx = torch.randperm(x.shape[0], generator=self.g)[: min(self.per_batch, self.cap - self.n)]
        self.rows.append(x[idx.to(x.device)].float())
        self.n += idx.numel()

    def result(self) -> torch.Tensor:
        return torch.cat(self.rows)

    def merge(self, other: _SampleStat) -> None:
        self.rows.extend(r.to(self.rows[0].device) if self.rows else r for r in other.rows)
        self.n += other.n

    def all_reduce(self, group=None) -> None:
        raise NotImplementedError("the row sample (SmoothQuant's alpha search) is not reduced across processes "
                                  "yet; use a fixed smoothquant alpha with several processes")


STATS = {"hessian": _HessianStat, "absmean": _AbsMeanStat, "absmax": _AbsMaxStat, "xsample": _SampleStat,
         "sqnorm": _SqNormStat}
