#!/usr/bin/env bash
# GPU check (about 10 minutes on one H200): training tokens/s and peak memory of FLM (V-space and
# embedded noise), FMLM distillation and MDLM at the paper's shape in bf16 at the largest batch that
# fits, and FMLM one-step vs AR-with-cache sampling at L = 1,024, compile off and on.
# Results: docs/results/gpu/gpu_check.{json,md}. `--tiny`: the CPU mode the tests run.
# Needs fmlm importable (pip install -e . or PYTHONPATH=src). Options: benchmarks/gpu_check.sh --help
set -euo pipefail
exec "${PYTHON:-python}" "$(dirname "$0")/gpu_check.py" "$@"
