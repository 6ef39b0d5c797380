#!/usr/bin/env bash
# The side-by-side benchmark: peers quantize smollm2-135m in their own environments, then
# bench/methods.py compresses the llmpress rows and evaluates everything in one run.
#   bench/peers/run.sh [OUT]        (make setup first; ~1.5 h on 2 CPU cores)
set -euo pipefail
cd "$(dirname "$0")/../.."
OUT=${1:-out/peers}
PEERS_PY=${PEERS_PY:-.peers-venv/bin/python}
LC_PY=${LC_PY:-.lc-venv/bin/python}
GM_PY=${GM_PY:-.gm-venv/bin/python}
[ -x "$PEERS_PY" ] && [ -x "$LC_PY" ] && [ -x "$GM_PY" ] || bench/peers/setup.sh
mkdir -p "$OUT"
.venv/bin/python -c "
import llmpress as lp; from safetensors.torch import save_file
m = lp.load('smollm2-135m'); t = lp.data.Calibration('wiki', n_samples=64, seqlen=512).tokens(m.llmpress_tokenizer)
save_file({'tokens': t.contiguous()}, '$OUT/calib.safetensors')"
"$PEERS_PY" bench/peers/bnb_nf4_check.py
"$PEERS_PY" bench/peers/quantize_peers.py "$OUT"
"$LC_PY" bench/peers/llmcompressor_run.py "$OUT/lc" "$OUT/calib.safetensors"
GPTQMODEL_CPU_WORKERS=2 "$GM_PY" bench/peers/gptqmodel_run.py "$OUT/gm" "$OUT/calib.safetensors"
PYTHONPATH=. "$PEERS_PY" bench/peers/bnb_int8_run.py "$OUT/bnb8"
.venv/bin/python bench/methods.py --peers "$OUT"
