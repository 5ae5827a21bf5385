#!/usr/bin/env bash
# The benchmarks behind the README's results tables (long; never part of CI).
#   bash scripts/bench.sh                # or: make bench — throughput, then both grids, then the tables
#   bash scripts/bench.sh omniglot       # one part: throughput | performance | images | omniglot | sinusoid | table | reference | gpu
# Environment:
#   BENCH_TIME      training budget per grid cell, DD:HH:MM:SS (default 00:00:01:30)
#   BENCH_EPISODES  fixed test episodes per grid cell (default 100)
#   BENCH_JOBS      grid runs at a time, one thread each (default 2, the cores of this machine)
#   BENCH_DIR       output directory (default outputs/bench); finished cells are skipped
#   PROTONET_TIME  a cap on the ProtoNet reference run (default: none, the preset's 20,000 episodes)
#   MAML_TIME      the MAML reference run's budget (default 25 minutes)
set -euo pipefail
cd "$(dirname "$0")/.."
: "${METARUN_DATA_DIR:?set METARUN_DATA_DIR to the folder that holds omniglot/}"
export METARUN_DATA_DIR
OUT="${BENCH_DIR:-outputs/bench}"
PY=.venv/bin/python
GRID=(--time "${BENCH_TIME:-00:00:01:30}" --episodes "${BENCH_EPISODES:-100}"
      --jobs "${BENCH_JOBS:-2}" --out "$OUT")
mkdir -p "$OUT"

throughput() {  # the real training step, MAML 5-way 1-shot Omniglot, meta-batch 32
    $PY scripts/benchmark.py experiment=maml_omniglot_5w1s bench.steps=5 | tee "$OUT/throughput.jsonl"
}
performance() {  # README "Performance": metarun against plain PyTorch, the fast CPU path, memory
    local P="$OUT/performance.jsonl" B=scripts/benchmark.py
    : > "$P"
    $PY $B experiment=maml_omniglot_5w1s task_batching=loop \
        -- experiment=maml_omniglot_5w1s task_batching=vmap bench.steps=10 bench.warmup=2 | tee -a "$P"
    # today's fp32 step first, then the presets' fast path (bf16 autocast + channels_last)
    $PY $B experiment=protonet_omniglot_20w1s hardware=cpu channels_last=false \
        -- experiment=protonet_omniglot_20w1s bench.steps=30 bench.warmup=5 | tee -a "$P"
    for size in 1 8 32; do  # one process each: peak RSS growth of second-order MAML, chunks of 1
        $PY $B experiment=maml_omniglot_5w1s sampler.meta_batch_size=$size task_chunk=1 bench.steps=3 | tee -a "$P"
    done
    $PY $B experiment=maml_omniglot_5w1s task_chunk=null bench.steps=3 | tee -a "$P"
    # the LSTM optimiser, 5-way 5-shot, meta-batch 32, second order: 4 outer steps, validation and test
    /usr/bin/time -v $PY -m metarun.train experiment=lstm_optimizer_omniglot_5w1s sampler.shots=5 \
        task_chunk=1 trainer.max_steps=4 trainer.val_check_interval=4 sampler.val_episodes=32 \
        sampler.test_episodes=64 trainer.enable_progress_bar=false logger=none \
        hydra.run.dir="$OUT/lstm_optimizer_5w5s_chunk1" 2> "$OUT/lstm_optimizer_5w5s_chunk1.time"
    grep -E "Maximum resident|Elapsed" "$OUT/lstm_optimizer_5w5s_chunk1.time"
}
images() {  # README "Image datasets": decode / cached start / sampling on real-size stand-ins, ResNet-12 steps
    local D="$OUT/data" M="$OUT/data/mini_imagenet" B=scripts/benchmark.py
    $PY scripts/benchmark_data.py --root "$D" | tee "$OUT/images.jsonl"
    # ResNet-12 against the plain-PyTorch reference, on the real-size mini-ImageNet stand-in (DropBlock off:
    # its masks come from the layer's generator, which the reference would advance differently)
    $PY $B experiment=protonet_mini_imagenet_resnet12_5w5s model.drop_rate=0 sampler.meta_batch_size=2 \
        dataset.root="$M/source" paths.cache_dir="$M/cache" bench.steps=4 bench.warmup=1 | tee -a "$OUT/images.jsonl"
    $PY $B dataset=mini_imagenet algorithm=maml model=resnet12 algorithm.inner_lr=0.01 algorithm.inner_steps=1 \
        sampler.meta_batch_size=2 dataset.root="$M/source" paths.cache_dir="$M/cache" bench.steps=2 bench.warmup=1 \
        | tee -a "$OUT/images.jsonl"
}
gpu() { $PY scripts/gpu_check.py "$OUT/gpu"; }  # needs a CUDA GPU (README: Performance)
omniglot() { $PY scripts/bench_grid.py omniglot "${GRID[@]}"; }
sinusoid() { $PY scripts/bench_grid.py sinusoid "${GRID[@]}"; }
table() { $PY scripts/bench_grid.py table --out "$OUT" | tee "$OUT/tables.md"; }
reference() {  # two longer runs with validation, best checkpoint tested on 600 episodes
    # ProtoNet: the preset as written (20,000 episodes, about an hour here) unless PROTONET_TIME caps it
    $PY -m metarun.train experiment=protonet_omniglot_20w1s ${PROTONET_TIME:+trainer.max_time=$PROTONET_TIME} \
        trainer.enable_progress_bar=false \
        hydra.run.dir="$OUT/protonet_omniglot_20w1s"
    $PY -m metarun.train experiment=maml_omniglot_5w1s trainer.max_time="${MAML_TIME:-00:00:25:00}" \
        trainer.val_check_interval=50 trainer.enable_progress_bar=false \
        hydra.run.dir="$OUT/maml_omniglot_5w1s"
    $PY scripts/summarize.py "$OUT"
}

case "${1:-all}" in
    all) throughput; performance; images; omniglot; sinusoid; table ;;
    throughput|performance|images|omniglot|sinusoid|table|reference|gpu) "$1" ;;
    *) echo "bench.sh: error: unknown part '$1'; choose all, throughput, performance, omniglot, sinusoid, table, reference or gpu" >&2
       exit 2 ;;
esac
