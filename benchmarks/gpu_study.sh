#!/usr/bin/env bash
# The compute-scaling study's GPU point: FLM, FMLM (semigroup), MDLM, Duo and AR on the same
# corpus, backbone and budget, far beyond what the CPU benches can afford, sampled at 1 to 1,024
# steps with every sample saved.
#
# Default: the `base-cpu` DiT (8 layers, width 384; about 14M parameters at the character level),
# 5,000 steps of batch 64 x 256 characters (82M tokens; x13 the tokens and about x190 the
# compute of `fmlm bench shakespeare-cpu`), the flow map distilled for 800/1500 of that, 128
# samples per setting. About 10 minutes on one H200 (an estimate: it has not run on one yet).
#
#   benchmarks/gpu_study.sh                          # on the GPU machine: trains and samples, no scorer
#   SCORERS=gemma-3-270m,smollm2-135m benchmarks/gpu_study.sh
#                                                     # then here, with the scorers installed: reuses the
#                                                     # sampled bench and scores its saved samples
#
# A GPU machine that reaches no network needs the corpus as a local file: DATA=path/to/corpus.txt
# (e.g. the embedded Shakespeare text from `fmlm data shakespeare`'s cache). Results, tables and
# plots go to $OUT_DIR (scaling.json, scaling.md, SIZE-BUDGET/results.json and samples.jsonl).
#
# Knobs (environment variables, defaults in brackets): SIZE [base-cpu], BUDGET [5000], BATCH [64],
# SEQ_LEN [256], STEPS [1,2,4,8,32,1024], N [128], SCORERS [none], DATA [shakespeare],
# DEVICE [auto], OUT_DIR [docs/results/scaling-gpu], CACHE [$FMLM_CACHE/bench], PYTHON [python3],
# EXTRA [more key=value overrides, space-separated].
set -euo pipefail
cd "$(dirname "$0")/.."

SIZE=${SIZE:-base-cpu}
BUDGET=${BUDGET:-5000}
BATCH=${BATCH:-64}
SEQ_LEN=${SEQ_LEN:-256}
STEPS=${STEPS:-1,2,4,8,32,1024}
N=${N:-128}
SCORERS=${SCORERS:-none}
DATA=${DATA:-shakespeare}
DEVICE=${DEVICE:-auto}
OUT_DIR=${OUT_DIR:-docs/results/scaling-gpu}
PYTHON=${PYTHON:-python3}

args=(bench scaling shakespeare-cpu "data.dataset=$DATA" "batch_size=$BATCH" "seq_len=$SEQ_LEN"
      --budgets "$BUDGET" --sizes "$SIZE" --steps "$STEPS" -n "$N" --scorers "$SCORERS" --out "$OUT_DIR")
# shellcheck disable=SC2206
[ -n "${EXTRA:-}" ] && args+=($EXTRA)
[ -n "${CACHE:-}" ] && args+=(--cache-dir "$CACHE")
[ "$DEVICE" != auto ] && args+=(--device "$DEVICE")
[ -n "${THREADS:-}" ] && args+=(--threads "$THREADS")

echo "gpu_study: fmlm ${args[*]}" >&2
start=$(date +%s)
PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 "$PYTHON" -m fmlm.cli "${args[@]}"
echo "gpu_study: done in $(( $(date +%s) - start )) s" >&2
