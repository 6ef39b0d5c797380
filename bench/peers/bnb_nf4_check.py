"""llmpress NF4 / FP4 (+ double quantization) against bitsandbytes itself, bit for bit.

Runs in the peers virtual environment (bitsandbytes is installed there, never in llmpress's):

    bench/peers/setup.sh && .peers-venv/bin/python bench/peers/bnb_nf4_check.py

Quantizes random tensors (normal, heavy-tailed, a partial last block, large values) and every
linear weight of smollm2-135m with both, and compares the packed 4-bit codes, the absmax values
(double quantization: the 8-bit absmax codes, second-level scales, offset and code book) and the
dequantized weights exactly; and checks that bitsandbytes dequantizes *our* stored bytes to
exactly our weights. bitsandbytes has two CPU kernels for the 8-bit absmax codes: its native
library (an approximate binary search) and its pure-torch kernel (nearest code, as ours). Both
are run: the torch-kernel run must match everywhere; for the native one the agreement of the
8-bit absmax codes is reported. Writes bench/results/bnb-nf4-check.json. With ``--cuda`` (on a
GPU machine, bitsandbytes' CUDA kernels quantize; ``LLMPRESS_REAL_LAYERS`` may name a
safetensors file of real layers) it writes ``$OUT/bnb-nf4-check-cuda.json`` instead.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]


def _load_nf4():
    spec = importlib.util.spec_from_file_location("lp_nf4", ROOT / "llmpress" / "quant" / "nf4.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules["lp_nf4"] = mod
    spec.loader.exec_module(mod)
    return mod


def _disable_native_library() -> None:
    import ctypes

    orig = ctypes.cdll.LoadLibrary

    def load(name, *a, **k):
        if "bitsandbytes" in str(name):
            raise OSError("native library disabled: use bitsandbytes' torch kernels")
        return orig(name, *a, **k)

    ctypes.cdll.LoadLibrary = load


def compare(nf4, w: torch.Tensor, quant_type: str, double: bool, dev: str = "cpu") -> dict:
    import bitsandbytes.functional as F
    from bitsandbytes.functional import QuantState

    packed, st = F.quantize_4bit(w.to(dev), blocksize=64, quant_type=quant_type, compress_statistics=double)
    if dev != "cpu":  # bitsandbytes' CUDA quantization, compared (and dequantized) on the CPU
        packed = packed.cpu()
        st.to("cpu")  # in place
    ours = nf4.quantize_4bit(w, quant_type, 64, double)
    codes = ours.codes.reshape(-1)
    our_packed = ((codes[::2] << 4) | codes[1::2]).reshape(-1, 1)
    res = {"codes_equal": bool(torch.equal(our_packed, packed))}
    if double:
        res["qabsmax_agreement"] = float((ours.absmax == st.absmax).float().mean())
        res["absmax2_equal"] = bool(torch.equal(ours.absmax2, st.state2.absmax))
        res["offset_equal"] = float(st.offset) == ours.offset
        res["code2_equal"] = bool(torch.equal(nf4.dynamic_code(), st.state2.code))
        st2 = QuantState(absmax=ours.absmax2, code=nf4.dynamic_code(), blocksize=256, dtype=torch.float32)
        qs = QuantState(absmax=ours.absmax, shape=w.shape, dtype=torch.float32, blocksize=64,
                        code=nf4.code(quant_type), quant_type=quant_type, offset=torch.tensor(ours.offset), state2=st2)
    else:
        res["absmax_equal"] = bool(torch.equal(ours.absmax, st.absmax))
        qs = QuantState(absmax=ours.absmax, shape=w.shape, dtype=torch.float32, blocksize=64,
                        code=nf4.code(quant_type), quant_type=quant_type)
    deq = F.dequantize_4bit(packed, st).float()
    mine = ours.dequantize(torch.float32)
    res["dequant_equal"] = bool(torch.equal(mine, deq))
    res["dequant_max_rel_diff"] = float((mine - deq).abs().max() / deq.abs().max())
    res["bnb_reads_ours_exactly"] = bool(torch.equal(F.dequantize_4bit(our_packed, qs).float(), mine))
    return res


def run(kernels: str) -> dict:
    if kernels == "torch":
        _disable_native_library()
    dev = "cuda" if kernels == "cuda" else "cpu"
    nf4 = _load_nf4()
    g = torch.Generator().manual_seed(0)
    rnd = {
        "normal_256x512": torch.randn(256, 512, generator=g),
        "heavy_tail_128x576": torch.randn(128, 576, generator=g) * (1 + 5 * torch.rand(128, 576, generator=g) ** 6),
        "partial_block_10x100": torch.randn(10, 100, generator=g),
        "large_64x4096": torch.randn(64, 4096, generator=g) * 50,
    }
    real = {}
    model_dir = Path(os.environ.get("LLMPRESS_CACHE", Path.home() / ".cache" / "llmpress")) / "models" / "smollm2-135m"
    src = Path(os.environ.get("LLMPRESS_REAL_LAYERS", model_dir / "model.safetensors"))  # a few layers, on a GPU box
    if src.exists():
        from safetensors import safe_open

        with safe_open(str(src), "pt") as f:
            real = {k: f.get_tensor(k) for k in f.keys() if k.endswith("proj.weight")}
    cases = {}
    for qt in ("nf4", "fp4"):
        for dq in (True, False):
            tag = f"{qt}{'-dq' if dq else ''}"
            for name, w in rnd.items():
                cases[f"{tag}/{name}"] = compare(nf4, w, qt, dq, dev)
            agg = [compare(nf4, w, qt, dq, dev) for w in real.values()]
            if agg:
                cases[f"{tag}/smollm2-135m ({len(agg)} weights)"] = {
                    k: all(a[k] for a in agg) if isinstance(agg[0][k], bool) else
                    (min if "agreement" in k else max)(a[k] for a in agg) for k in agg[0]}
    import bitsandbytes

    return {"bitsandbytes": bitsandbytes.__version__, "kernels": kernels, "cases": cases}


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        print(json.dumps(run(sys.argv[2])))
        return
    out = {}
    cuda = "--cuda" in sys.argv  # on a GPU machine: bitsandbytes' CUDA quantization alone
    for kernels in ("cuda",) if cuda else ("native", "torch"):
        p = subprocess.run([sys.executable, __file__, "--child", kernels], capture_output=True, text=True, check=True)
        out[kernels] = json.loads(p.stdout.strip().splitlines()[-1])
    must_all = ("codes_equal", "absmax_equal", "absmax2_equal", "offset_equal", "code2_equal", "bnb_reads_ours_exactly")
    ok = True
    for kernels, r in out.items():
        print(f"## bitsandbytes {r['bitsandbytes']}, {kernels} kernels")
        for k, c in r["cases"].items():
            print(f"{k:40s} " + " ".join(f"{a}={b:.6g}" if isinstance(b, float) else f"{a}={b}" for a, b in c.items()))
            ok &= all(v for a, v in c.items() if a in must_all)
            if kernels == "torch":
                ok &= c.get("dequant_equal", True) and c.get("qabsmax_agreement", 1.0) == 1.0
    summary = {"all_equal_where_required": ok, "torch": torch.__version__, **out}
    out_dir = Path(os.environ.get("OUT", ROOT / "bench" / "results"))
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / f"bnb-nf4-check{'-cuda' if cuda else ''}.json").write_text(json.dumps(summary, indent=2))
    print("OK: identical to bitsandbytes" if ok else "MISMATCH")
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
