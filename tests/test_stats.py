"""Statistics computed on shares of the calibration rows combine to the statistic of all rows,
in one process (merge) and across processes (all_reduce over a gloo group)."""

import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from llmpress.stats import STATS

KINDS = ("hessian", "absmean", "sqnorm", "absmax")


def _data():
    g = torch.Generator().manual_seed(0)
    return [torch.randn(3, 17, 24, generator=g) * torch.rand(24, generator=g) for _ in range(5)]


def _stat(kind, xs):
    st = STATS[kind](24, torch.device("cpu"))
    for x in xs:
        st.update(x)
    return st


@pytest.mark.parametrize("kind", KINDS)
def test_merge_equals_one_pass(kind):
    xs = _data()
    whole = _stat(kind, xs)
    a, b = _stat(kind, xs[:2]), _stat(kind, xs[2:])
    a.merge(b)
    torch.testing.assert_close(a.result(), whole.result(), rtol=1e-5, atol=1e-6)
    empty = STATS[kind](24, torch.device("cpu"))
    empty.merge(whole)
    torch.testing.assert_close(empty.result(), whole.result())


def _worker(rank, world, port, out):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    xs = _data()
    for kind in KINDS:
        st = _stat(kind, xs[rank::world])  # this process's share of the samples
        st.all_reduce()
        if rank == 0:
            out[kind] = st.result().clone()
    dist.destroy_process_group()


def test_all_reduce_across_processes():
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = mp.Manager().dict()
    mp.spawn(_worker, args=(2, port, out), nprocs=2, join=True)
    xs = _data()
    for kind in KINDS:
        torch.testing.assert_close(out[kind], _stat(kind, xs).result(), rtol=1e-5, atol=1e-6)
    with pytest.raises(NotImplementedError, match="smoothquant"):
        STATS["xsample"](24, torch.device("cpu")).all_reduce()
