"""The kernels' layout, its reference matmul, the CPU kernels, the dispatcher, and the Triton
kernel itself through Triton's CPU interpreter (a subprocess with TRITON_INTERPRET=1)."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
import torch
import torch.nn.functional as F

from llmpress import kernels
from llmpress.kernels import cpu, layout
from llmpress.nn import CodebookLinear, QuantLinear
from llmpress.quant import nf4
from llmpress.quant.primitives import QuantizedWeight, QuantScheme
from llmpress.quant.rtn import rtn

SCHEMES = [
    QuantScheme(4, True, "group", 64), QuantScheme(4, False, "group", 128), QuantScheme(4, False, "group", 32),
    QuantScheme(8, True, "channel"), QuantScheme(8, False, "group", 64), QuantScheme(3, False, "group", 64),
    QuantScheme(2, False, "group", 32), QuantScheme(4, True, "tensor"),
]


def _qw(n: int, k: int, scheme: QuantScheme, seed: int = 0) -> QuantizedWeight:
    g = torch.Generator().manual_seed(seed)
    return rtn(torch.randn(n, k, generator=g), scheme)


@pytest.mark.parametrize("kmajor", [None, False], ids=["default", "n-major"])
@pytest.mark.parametrize("scheme", SCHEMES, ids=lambda s: s.describe())
def test_layout_roundtrip_and_reference(scheme, kmajor):
    qw = _qw(72, 256, scheme)
    p = layout.pack(qw, torch.float32, kmajor=kmajor)
    assert p.kmajor == (kmajor is None and scheme.bits <= 4)  # K-major by default for 4-bit slots
    q = p.qw_nk
    assert q.dtype == torch.int32 and q.shape[0] == 72 and q.shape[1] * p.per_word % layout.PAD_K == 0
    assert p.scale_ng.shape[0] == 72 and (not p.kmajor or (p.qw.is_contiguous() and p.qw.shape[1] == 72))
    if scheme.bits > 4:
        with pytest.raises(layout.UnsupportedLayout, match="4-bit"):
            layout.pack(qw, kmajor=True)
    torch.testing.assert_close(layout.dequantize(p), qw.dequantize(), rtol=0, atol=1e-6)
    x = torch.randn(5, 256)
    b = torch.randn(72)
    torch.testing.assert_close(layout.reference_matmul(x, p, b), F.linear(x, qw.dequantize(), b), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("qt", ["nf4", "fp4"])
def test_layout_codebook(qt):
    cw = nf4.quantize_4bit(torch.randn(48, 128), qt, 64, True)
    p = layout.pack(cw, torch.float32)
    assert p.lut is not None and p.group_size == 64
    torch.testing.assert_close(layout.dequantize(p), cw.dequantize().float(), rtol=0, atol=1e-6)


def test_layout_unsupported():
    w = torch.randn(32, 64)
    fp8 = QuantScheme(8, True, "channel", type="float")
    with pytest.raises(layout.UnsupportedLayout, match="integer"):
        layout.pack(rtn(w, fp8))
    ax0 = QuantScheme(4, False, "group", 16, group_axis=0)
    with pytest.raises(layout.UnsupportedLayout, match="output dimension"):
        layout.pack(rtn(w, ax0))
    p = layout.pack(_qw(16, 64, QuantScheme(8, False, "group", 8)))
    with pytest.raises(layout.UnsupportedLayout, match="group size 8"):
        kernels.check_supported(p)


@pytest.mark.parametrize("scheme", [QuantScheme(4, True, "group", 64), QuantScheme(4, False, "group", 32),
                                    QuantScheme(3, False, "group", 128), QuantScheme(8, True, "channel")],
                         ids=lambda s: s.describe())
def test_cpu_kernels_match_reference(scheme):
    qw = _qw(96, 256, scheme, seed=1)
    p = cpu.pack_cpu(qw, torch.bfloat16)
    x = torch.randn(7, 256).bfloat16()
    b = torch.randn(96)
    ref = F.linear(x.float(), qw.dequantize(), b)
    y = cpu.matmul(x, p, b)
    assert y.dtype == torch.bfloat16
    err = float((y.float() - ref).norm() / ref.norm())
    assert err < 1e-2, err


def test_packed_layout_is_built_once_also_when_unsupported(monkeypatch):
    calls = []
    real = kernels.pack
    monkeypatch.setattr(kernels, "pack", lambda *a, **k: calls.append(1) or real(*a, **k))
    ok = QuantLinear(_qw(32, 64, QuantScheme(4, True, "group", 32)))
    p = kernels.packed_for(ok, torch.device("cpu"), torch.float32)
    assert kernels.packed_for(ok, torch.device("cpu"), torch.float32) is p and len(calls) == 1
    fp8 = QuantLinear(rtn(torch.randn(32, 64), QuantScheme(8, True, "channel", type="float")))
    for _ in range(3):  # the refusal is remembered: no re-packing on every forward
        with pytest.raises(layout.UnsupportedLayout, match="integer"):
            kernels.packed_for(fp8, torch.device("cpu"), torch.float32)
    assert len(calls) == 2


def test_cpu_kernel_rejects():
    with pytest.raises(layout.UnsupportedLayout):
        cpu.pack_cpu(_qw(32, 64, QuantScheme(8, False, "group", 32)))


def test_dispatch_cpu_bf16_and_modes(monkeypatch):
    qw = _qw(64, 128, QuantScheme(4, False, "group", 32), seed=2)
    lin = QuantLinear(qw, bias=torch.randn(64))
    x = torch.randn(3, 128).bfloat16()
    ref = F.linear(x.float(), qw.dequantize(), lin.bias.float())
    monkeypatch.setenv("LLMPRESS_KERNELS", "auto")
    y = lin(x)
    assert "_kernel_cache" in lin.__dict__ and lin._kernel_cache[("cpu", torch.bfloat16)] is not None
    assert float((y.float() - ref).norm() / ref.norm()) < 1e-2
    assert "_kernel_cache" not in lin.state_dict()
    monkeypatch.setenv("LLMPRESS_KERNELS", "reference")
    assert kernels.linear(lin, x) is None
    monkeypatch.setenv("LLMPRESS_KERNELS", "bogus")
    with pytest.raises(ValueError, match="LLMPRESS_KERNELS"):
        lin(x)
    # float32 inputs and code-book layers stay on the reference path on the CPU
    monkeypatch.setenv("LLMPRESS_KERNELS", "auto")
    assert kernels.linear(lin, x.float()) is None
    cl = CodebookLinear(nf4.quantize_4bit(torch.randn(32, 128), "nf4", 64, True))
    assert kernels.linear(cl, x) is None
    torch.testing.assert_close(cl(x.float()), F.linear(x.float(), cl.weight.float()))


_INTERP = textwrap.dedent("""
    import os, sys, torch
    os.environ["TRITON_INTERPRET"] = "1"
    from llmpress.kernels import layout
    from llmpress.kernels.triton_wa16 import dequantize, matmul
    from llmpress.quant import nf4
    from llmpress.quant.primitives import QuantScheme
    from llmpress.quant.rtn import rtn
    g = torch.Generator().manual_seed(int(sys.argv[1]))
    cases = [(QuantScheme(4, True, "group", 64), 96, 256), (QuantScheme(4, False, "group", 128), 100, 384),
             (QuantScheme(4, False, "group", 32), 40, 160), (QuantScheme(8, True, "channel"), 72, 200),
             (QuantScheme(8, False, "group", 64), 33, 192), (QuantScheme(3, False, "group", 32), 64, 256),
             (QuantScheme(2, False, "group", 32), 24, 128), (QuantScheme(4, False, "group", 256), 40, 512),
             ("nf4", 80, 256), ("fp4", 48, 128), ("hqq", 64, 256)]
    worst = 0.0
    for sch, n, k in cases:
        w = torch.randn(n, k, generator=g)
        if sch == "hqq":  # float zero points (the w4a16-hqq preset): the M = 1 kernel once rounded them
            from llmpress.quant.hqq import HQQConfig, hqq
            q = hqq(w, QuantScheme(4, False, "group", 64), HQQConfig(int_zero=False))
            assert (q.zero != q.zero.round()).any()
            W = q.dequantize()
        elif isinstance(sch, str):
            q = nf4.quantize_4bit(w, sch, 64, True)
            W = q.dequantize().float()
        else:
            q = rtn(w, sch)
            W = q.dequantize()
        int4 = sch == "hqq" or (not isinstance(sch, str) and sch.bits <= 4)  # integer codes in 4-bit slots
        for dt, km in ((torch.float32, None), (torch.float16, None)) + (((torch.float16, False),) if int4 else ()):
            p = layout.pack(q, dt, kmajor=km)
            assert p.kmajor == (int4 and km is None)
            if p.kmajor:  # K-major GEMV: (BLOCK_N, word rows per step, steps, warps), steps inside a group
                gs = p.group_size
                gemvs = [(1, None, c) for c in ((64, 4, 2, 4), (16, 4, 1, 8), (32, 2, 4, 4))
                         if gs >= k or gs % (8 * c[1]) == 0] + [(1, None, None)]
            else:
                gemvs = [(1, None, (32, 32, 2, 4, True)), (1, None, (16, 64, 1, 4, False)),
                         (1, None, (16, 8, 3, 4, True)), (1, None, (8, 8, 3, 4, True))]
            tcs = [] if km is False else [(1, (32, 64, 2, 4, 2), None), (5, (64, 32, 1, 4, 2), None),
                                          (19, (32, 128, 3, 4, 2), None), (70, (16, 64, 3, 4, 2), None),
                                          (9, None, None), (100, None, None)]
            for m, cfg, gcfg in gemvs + tcs:
                x = torch.randn(m, k, generator=g)
                b = torch.randn(n, generator=g)
                y = matmul(x.to(dt), p, b.to(dt), config=cfg, gemv_config=gcfg)
                assert y.dtype == dt and y.shape == (m, n)
                ref = x.to(dt).float() @ W.t() + b.to(dt).float()
                err = float((y.float() - ref).norm() / ref.norm())
                tol = 1e-5 if dt == torch.float32 else 3e-3
                assert err < tol, (sch, n, k, m, dt, err)
                worst = max(worst, err)
        for km in ((None, False) if int4 else (None,)):
            p32 = layout.pack(q, torch.float32, kmajor=km)
            assert torch.equal(dequantize(p32, torch.float32), layout.dequantize(p32))  # the prefill path's weight
    from llmpress.kernels.triton_wa16 import _WORKSPACES
    for ws, cnt in _WORKSPACES.values():  # split-K leaves its workspace and counters zeroed
        assert not ws.any() and not cnt.any()
    try:  # tiles narrower than the split-K counters cover are refused
        matmul(torch.randn(1, 256), layout.pack(rtn(torch.randn(16, 256), QuantScheme(4, True, "group", 64)),
                                                kmajor=False), gemv_config=(4, 8, 2, 4, True))
        raise SystemExit("a 4-column GEMV tile was accepted")
    except ValueError as e:
        assert "narrowest tile" in str(e), e
    print("OK", worst)
""")


def test_triton_kernel_interpreted():
    pytest.importorskip("triton")
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    r = subprocess.run([sys.executable, "-c", _INTERP, "7"], capture_output=True, text=True, env=env, timeout=600)
    assert r.returncode == 0 and "OK" in r.stdout, r.stderr[-3000:]


def test_gemv_wide_tiles_are_the_packed_half_paths_own():
    """The autotuner offers the 64-words-per-thread GEMV tiles only to the packed-half path (4-bit
    integer codes; the float32 path spills registers at that width). The packed-half path itself
    is inline PTX, checked on the GPU only (bench/gemv_probe.py)."""
    pytest.importorskip("triton")
    from llmpress.kernels import triton_wa16 as tw

    cfgs = tw._GEMV_AUTOTUNE["configs"]
    wide = [c for c in cfgs if c.kwargs["BLOCK_N"] * c.kwargs["WORDS"] > 32 * 32 * c.num_warps]
    assert wide  # there are such tiles to prune
    args = {"GS": 128, "K": 4096}
    n = len(cfgs)
    assert len(tw._prune_gemv(cfgs, args, BITS=4, F16X2=True, HAS_LUT=False)) == n
    for kw in (dict(BITS=4, F16X2=False), dict(BITS=8, F16X2=True), dict(BITS=4, F16X2=True, HAS_LUT=True)):
        kept = tw._prune_gemv(cfgs, args, **kw)
        assert len(kept) == n - len(wide), kw
        assert all(c.kwargs["BLOCK_N"] * c.kwargs["NG"] * c.kwargs["WPG"] <= 32 * 32 * c.num_warps for c in kept)


def test_kmajor_gemv_configurations_fit_groups_and_narrow_layers():
    """The K-major GEMV's autotuner only offers steps inside one group that split the packed K
    into whole programs, and no tiles far wider than the layer."""
    pytest.importorskip("triton")
    from llmpress.kernels import triton_wa16 as tw

    cfgs = tw._KN_AUTOTUNE["configs"]
    g32 = tw._prune_kn(cfgs, {"GS": 32, "K": 4096, "N": 4096})
    assert g32 and all(c.kwargs["BW"] * 8 <= 32 for c in g32)
    chan = tw._prune_kn(cfgs, {"GS": 1 << 30, "K": 4096, "N": 4096})
    assert len(chan) == len(cfgs)  # per channel: every step fits
    narrow = tw._prune_kn(cfgs, {"GS": 128, "K": 4096, "N": 64})
    assert narrow and all(c.kwargs["BLOCK_N"] <= 128 for c in narrow)
    ragged = tw._prune_kn(cfgs, {"GS": 1 << 30, "K": 200, "N": 4096})  # packed to 256: 32 word rows
    assert ragged and all(32 % (c.kwargs["BW"] * c.kwargs["STEPS"]) == 0 for c in ragged)
    assert tw._kn_heuristics({"K": 200, "N": 4096, "BW": 16, "STEPS": 1, "BLOCK_N": 512}) == {"SPLIT": 2, "EVEN": False}
