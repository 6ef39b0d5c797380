#!/usr/bin/env bash
# Peers in their own virtual environments (never llmpress dependencies), CPU torch pinned.
#   .peers-venv: bitsandbytes (CPU NF4/FP4) + hqq;  .lc-venv: llmcompressor (+compressed-tensors, datasets)
set -euo pipefail
cd "$(dirname "$0")/../.."
TORCH="torch==2.13.0"
SRC=$([ -n "$(ls /opt/wheels/torch-2.13.0* 2>/dev/null)" ] && echo "--find-links /opt/wheels" \
      || echo "--index-url https://download.pytorch.org/whl/cpu --extra-index-url https://pypi.org/simple")
[ -x .peers-venv/bin/python ] || { python3 -m venv .peers-venv
  .peers-venv/bin/pip install -q $TORCH $SRC
  .peers-venv/bin/pip install -q $TORCH bitsandbytes==0.50.2 hqq==0.2.8.post1 transformers accelerate safetensors numpy; }
[ -x .lc-venv/bin/python ] || { python3 -m venv .lc-venv
  .lc-venv/bin/pip install -q $TORCH $SRC
  .lc-venv/bin/pip install -q $TORCH llmcompressor==0.14.0.1; }
echo "peer environments ready"
