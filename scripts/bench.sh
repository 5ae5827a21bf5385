#!/usr/bin/env bash
# The benchmarks behind the README's results tables (long; never part of CI).
#   bash scripts/bench.sh            # or: make bench
# Budgets are wall-clock (trainer.max_time) so the run fits a 2-core CPU; each run then
# tests its best validation checkpoint on the 600 fixed test episodes.
set -euo pipefail
cd "$(dirname "$0")/.."
export METARUN_DATA_DIR="${METARUN_DATA_DIR:-../shared/data}"
OUT="${BENCH_DIR:-outputs/bench}"
PY=.venv/bin/python
PROTONET_TIME="${PROTONET_TIME:-00:00:20:00}"
MAML_TIME="${MAML_TIME:-00:00:25:00}"
mkdir -p "$OUT"

# 1. Throughput of the real training step, MAML 5-way 1-shot Omniglot, meta-batch 32.
$PY scripts/benchmark.py experiment=maml_omniglot_5w1s bench.steps=5 | tee "$OUT/throughput.jsonl"

# 2. Accuracy after a fixed training budget on this machine.
$PY -m metarun.train experiment=protonet_omniglot_20w1s trainer.max_time="$PROTONET_TIME" \
    trainer.val_check_interval=200 trainer.enable_progress_bar=false \
    hydra.run.dir="$OUT/protonet_omniglot_20w1s"
$PY -m metarun.train experiment=maml_omniglot_5w1s trainer.max_time="$MAML_TIME" \
    trainer.val_check_interval=50 trainer.enable_progress_bar=false \
    hydra.run.dir="$OUT/maml_omniglot_5w1s"

$PY scripts/summarize.py "$OUT"
