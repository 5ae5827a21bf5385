#!/usr/bin/env bash
# The modern recipe against episodic ProtoNet from scratch, on real Omniglot 20-way 1-shot,
# at an equal training budget on this machine, scored on the same 600 fixed test episodes:
#   A. ProtoNet from scratch (experiment=protonet_omniglot_20w1s) for the whole budget;
#   B. pretrain_omniglot_20w1s for 5/8 of it, then meta_baseline_omniglot_20w1s from that run
#      (model.init_from) for 3/8;
#   C. B's learner fine-tuned on each test support set (test_time.*, the rate picked on 5
#      validation episodes; its cost is reported, not part of the training budget).
#   bash scripts/recipe_comparison.sh      # RECIPE_MINUTES (default 8), RECIPE_DIR (outputs/recipe)
set -euo pipefail
cd "$(dirname "$0")/.."
: "${METARUN_DATA_DIR:?set METARUN_DATA_DIR to the folder that holds omniglot/}"
export METARUN_DATA_DIR
OUT="${RECIPE_DIR:-outputs/recipe}"
MINUTES="${RECIPE_MINUTES:-8}"
BIN=.venv/bin
budget() {  # seconds -> DD:HH:MM:SS
    printf '00:00:%02d:%02d' $(($1 / 60)) $(($1 % 60))
}
TOTAL=$((MINUTES * 60))
PRE=$((TOTAL * 5 / 8))
META=$((TOTAL - PRE))
# plain fp32 for every arm (the bf16 path is fast only where the CPU has native bf16 kernels)
COMMON=(logger=csv trainer.enable_progress_bar=false sampler.test_episodes=600 hardware=cpu channels_last=false)
best() {  # the best validation checkpoint a finished run names
    $BIN/python -c "import json,sys; print(json.load(open(sys.argv[1]))['val']['best_checkpoint'])" "$1/results.json"
}
[ -f "$OUT/protonet/results.json" ] || $BIN/metarun experiment=protonet_omniglot_20w1s "${COMMON[@]}" \
    trainer.max_time="$(budget $TOTAL)" hydra.run.dir="$OUT/protonet"
[ -f "$OUT/pretrain/results.json" ] || $BIN/metarun experiment=pretrain_omniglot_20w1s "${COMMON[@]}" \
    trainer.max_time="$(budget $PRE)" hydra.run.dir="$OUT/pretrain"
[ -f "$OUT/meta_baseline/results.json" ] || $BIN/metarun experiment=meta_baseline_omniglot_20w1s "${COMMON[@]}" \
    model.init_from="$OUT/pretrain" trainer.max_time="$(budget $META)" hydra.run.dir="$OUT/meta_baseline"
[ -f "$OUT/finetuned/results.json" ] || /usr/bin/time -f "fine-tuned test: %e s" $BIN/metarun-eval \
    ckpt_path="$(best "$OUT/meta_baseline")" test_time.finetune_steps=10 test_time.lr=auto test_time.augment=true \
    hydra.run.dir="$OUT/finetuned"
$BIN/python - "$OUT" <<'PY'
import json, sys
from pathlib import Path
out = Path(sys.argv[1])
for name in ("protonet", "pretrain", "meta_baseline", "finetuned"):
    r = json.loads((out / name / "results.json").read_text())
    acc = r["test"]["accuracy"]
    train = r.get("train") or {}
    print(f"{name:14s} {100 * acc['mean']:.2f} ± {100 * acc['ci95']:.2f} %  ({acc['episodes']} episodes; "
          f"{train.get('steps', '-')} steps in {train.get('wall_seconds', 0):.0f} s)")
PY
