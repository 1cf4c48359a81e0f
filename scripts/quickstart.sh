#!/usr/bin/env bash
# Quick start: install, then run the offline digits demo (teacher, student alone, KD, OFA, PAT) and print its table.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1
.venv/bin/python benchmarks/digits_demo.py "$@"
