#!/usr/bin/env bash
# Peers in their own virtual environments (never llmpress dependencies), CPU torch pinned.
#   .peers-venv: bitsandbytes (CPU NF4/FP4, LLM.int8) + hqq;  .lc-venv: llmcompressor (+compressed-tensors,
#   datasets);  .gm-venv: gptqmodel (7.5.0: the last release that accepts the pinned CPU torch 2.13;
#   7.7 wants torch>=2.14.1);  .llama-venv: llama-cpp-python (llama.cpp built from source)
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
[ -x .gm-venv/bin/python ] || { python3 -m venv .gm-venv
  .gm-venv/bin/pip install -q $TORCH $SRC
  BUILD_CUDA_EXT=0 .gm-venv/bin/pip install -q $TORCH gptqmodel==7.5.0; }
# .llama-venv: llama-cpp-python builds llama.cpp from source (about 7 minutes on 2 cores); bench/export.py
# and bench/gguf_plan.py call its llama_model_quantize, its greedy generation and its libggml-base.
[ -x .llama-venv/bin/python ] || { python3 -m venv .llama-venv
  .llama-venv/bin/pip install -q numpy gguf==0.19.0
  CMAKE_ARGS="-DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_TESTS=OFF" CMAKE_BUILD_PARALLEL_LEVEL=2 \
    .llama-venv/bin/pip install -q llama-cpp-python==0.3.36; }
echo "peer environments ready"
