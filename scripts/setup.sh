#!/usr/bin/env bash
# Create .venv and install pat-hf with its test tools. torch is pinned here (not in setup.cfg) to the build
# this project is developed and tested with; pip takes it from the local disk where one is provided.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m venv .venv
.venv/bin/python -m pip install --quiet --upgrade pip
.venv/bin/python -m pip install --quiet "torch==2.14.1" "torchvision==0.29.1"
.venv/bin/python -m pip install --quiet -e ".[test]"
echo "pat-hf installed in $(pwd)/.venv"
