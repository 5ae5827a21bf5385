#!/usr/bin/env bash
# The learners after 2018 beside ProtoNet on real Omniglot 5-way 1-shot, each trained for the
# same wall-clock budget on this machine from its CPU preset, validated every 250 steps on 100
# episodes, and its best-validation checkpoint scored on the same 600 fixed test episodes; then
# ProtoNet's checkpoint labelled transductively by each method (metarun-eval, the same episodes).
#   bash scripts/omniglot_comparison.sh   # HEADS_MINUTES (default 4), HEADS_DIR (outputs/heads)
set -euo pipefail
cd "$(dirname "$0")/.."
: "${METARUN_DATA_DIR:?set METARUN_DATA_DIR to the folder that holds omniglot/}"
export METARUN_DATA_DIR
OUT="${HEADS_DIR:-outputs/heads}"
MINUTES="${HEADS_MINUTES:-4}"
BIN=.venv/bin
# plain fp32 for every arm (the bf16 path is fast only where the CPU has native bf16 kernels)
COMMON=(logger=csv trainer.enable_progress_bar=false hardware=cpu channels_last=false
    trainer.max_time="00:00:$(printf '%02d' "$MINUTES"):00" trainer.val_check_interval=250
    sampler.val_episodes=100 sampler.test_episodes=600)
for preset in protonet_omniglot_5w1s r2d2_omniglot_5w1s metaoptnet_omniglot_5w1s feat_omniglot_5w1s \
    cavia_omniglot_5w1s imaml_omniglot_5w1s; do
    [ -f "$OUT/$preset/results.json" ] || $BIN/metarun experiment="$preset" "${COMMON[@]}" hydra.run.dir="$OUT/$preset"
done
best=$($BIN/python -c "import json,sys; print(json.load(open(sys.argv[1]))['val']['best_checkpoint'])" \
    "$OUT/protonet_omniglot_5w1s/results.json")
for method in bd_cspn tim pt_map; do
    [ -f "$OUT/protonet_$method/results.json" ] || $BIN/metarun-eval ckpt_path="$best" hardware=cpu \
        algorithm.transductive="$method" hydra.run.dir="$OUT/protonet_$method"
done
$BIN/python - "$OUT" <<'PY'
import json, sys
from pathlib import Path
for run in sorted(Path(sys.argv[1]).iterdir()):
    r = json.loads((run / "results.json").read_text())
    acc, train = r["test"]["accuracy"], r.get("train") or {}
    print(f"{run.name:26s} {100 * acc['mean']:.2f} ± {100 * acc['ci95']:.2f} %  ({acc['episodes']} episodes; "
          f"{train.get('steps', '-')} steps in {train.get('wall_seconds', 0):.0f} s; {r['experiment'].get('inference', 'inductive')})")
PY
