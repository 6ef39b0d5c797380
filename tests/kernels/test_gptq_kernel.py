"""The Triton GPTQ lazy-batch kernel against the torch reference loop, run through Triton's CPU
interpreter in a subprocess (TRITON_INTERPRET must be set before triton is imported)."""

import os
import subprocess
import sys
import textwrap

import pytest
import torch

from llmpress.quant.gptq import GPTQConfig, gptq
from llmpress.quant.primitives import QuantScheme

_SCRIPT = textwrap.dedent("""
    import torch
    from llmpress.quant.gptq import GPTQConfig, gptq
    from llmpress.quant.primitives import QuantScheme
    torch.manual_seed(0)
    cases = [  # (rows, cols, scheme, config, masked): partial last batch, per-channel, masks, 2..8 bits
        (40, 96, QuantScheme(4, True, "group", 32), GPTQConfig(block_size=32), False),
        (33, 64, QuantScheme(3, False, "channel", None), GPTQConfig(block_size=64, act_order=False), False),
        (24, 64, QuantScheme(4, False, "group", 16), GPTQConfig(block_size=48), True),
        (17, 128, QuantScheme(2, False, "group", 64), GPTQConfig(block_size=128), False),
        (20, 64, QuantScheme(8, True, "tensor", None), GPTQConfig(block_size=16, act_order=False), False),
    ]
    for n, k, scheme, cfg, masked in cases:
        w = torch.randn(n, k)
        x = torch.randn(256, k) * torch.rand(k) * 3
        h = 2 * x.T @ x / 256
        m = torch.rand(n, k) > 0.5 if masked else None
        a = gptq(w, h, scheme, cfg, mask=m, kernel=False)
        b = gptq(w, h, scheme, cfg, mask=m, kernel=True)
        same = (a.qdata == b.qdata).float().mean().item()
        assert same > 0.999, (scheme, same)
        assert torch.equal(a.scale, b.scale)
        assert abs(a.info["gptq_loss"] - b.info["gptq_loss"]) <= 1e-4 * abs(a.info["gptq_loss"]) + 1e-6
        if m is not None:
            assert (b.dequantize()[~m] == 0).all()
    print("OK")
""")


def test_gptq_kernel_interpreted():
    pytest.importorskip("triton")
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    r = subprocess.run([sys.executable, "-c", _SCRIPT], capture_output=True, text=True, env=env, timeout=600)
    assert r.returncode == 0 and "OK" in r.stdout, r.stderr[-3000:]


def test_gptq_kernel_refuses_lazy_groups():
    w, h = torch.randn(8, 32), torch.eye(32)
    with pytest.raises(ValueError, match="static integer groups"):
        gptq(w, h, QuantScheme(4, True, "group", 16), GPTQConfig(act_order=False), kernel=True)
