"""The GPU figures of the README in one run (about 6 minutes on one H100/H200).

    python scripts/gpu_check.py OUT_DIR

Needs a CUDA GPU and Omniglot under METARUN_DATA_DIR. Appends one JSON line per
measurement to OUT_DIR/gpu.jsonl as it goes (so a run cut short keeps what it measured):

1. throughput of the real training step against the plain-PyTorch reference
   (`scripts/benchmark.py`): MAML 5-way 1-shot, meta-batch 32, second order, and ProtoNet
   20-way 1-shot (60-way training episodes), each in fp32 and bf16, tasks looped and vmapped;
2. peak CUDA memory of second-order MAML at meta-batch 1, 8 and 32 with task_chunk=1, and
   at 32 unchunked;
3. a few steps of hardware=fp16 with grad_clip (the clipping test, tests/test_precision.py,
   runs separately: `pytest tests/test_precision.py -k clipped`);
4. hardware=gpu end to end: `metarun experiment=maml_omniglot_5w1s hardware=gpu` for 300
   outer steps with validation and a 200-episode test; its results.json is copied to OUT_DIR.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch
from hydra.core.global_hydra import GlobalHydra

sys.path.insert(0, str(Path(__file__).resolve().parent))
import benchmark  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
MAML = ["experiment=maml_omniglot_5w1s", "hardware=gpu"]
# transductive batch norm for ProtoNet, so that the same model can run looped and vmapped
PROTONET = [
    "experiment=protonet_omniglot_20w1s",
    "hardware=gpu",
    "model.norm=transductive",
    "channels_last=false",
]
PRECISIONS = {"fp32": ["trainer.precision=32-true"], "bf16": ["trainer.precision=bf16-mixed"]}


def record(out: Path, entry: dict) -> None:
    print(json.dumps(entry), flush=True)
    with (out / "gpu.jsonl").open("a") as f:
        f.write(json.dumps(entry) + "\n")


def bench(out: Path, name: str, overrides: list[str], steps: int = 20, warmup: int = 5) -> None:
    GlobalHydra.instance().clear()
    torch.cuda.empty_cache()
    started = time.time()
    try:
        result = benchmark.main([*overrides, f"bench.steps={steps}", f"bench.warmup={warmup}"])
    except Exception as error:  # keep measuring the rest
        result = {"error": f"{type(error).__name__}: {error}"[:500], "overrides": overrides}
    record(out, {"check": name, "wall_s": round(time.time() - started, 1), **result})


def main(out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    record(
        out,
        {
            "check": "environment",
            "torch": torch.__version__,
            "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
            "date": time.strftime("%Y-%m-%d"),
        },
    )
    for precision, setting in PRECISIONS.items():
        for batching in ("loop", "vmap"):
            bench(out, f"maml_5w1s_{precision}_{batching}", [*MAML, *setting, f"task_batching={batching}"])
    for precision, setting in PRECISIONS.items():
        for batching in ("loop", "vmap"):
            bench(
                out,
                f"protonet_20w1s_{precision}_{batching}",
                [*PROTONET, *setting, f"task_batching={batching}"],
                steps=30,
            )
    for size, chunk in ((1, 1), (8, 1), (32, 1), (32, None)):
        bench(
            out,
            f"maml_memory_batch{size}_chunk{chunk}",
            [*MAML, f"sampler.meta_batch_size={size}", f"task_chunk={chunk or 'null'}", "task_batching=loop"],
            steps=3,
            warmup=1,
        )
    bench(out, "maml_fp16_grad_clip", [*MAML, "hardware=fp16", "grad_clip=1.0"], steps=5, warmup=2)
    run_dir = ROOT / "outputs" / "gpu_check" / "maml_gpu"
    shutil.rmtree(run_dir, ignore_errors=True)
    started = time.time()
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "metarun.train",
            *MAML,
            "trainer.max_steps=300",
            "trainer.val_check_interval=100",
            "sampler.val_episodes=100",
            "sampler.test_episodes=200",
            "trainer.enable_progress_bar=false",
            "logger=csv",
            f"hydra.run.dir={run_dir}",
        ],
        capture_output=True,
        text=True,
    )
    entry = {
        "check": "hardware_gpu_end_to_end",
        "returncode": done.returncode,
        "wall_s": round(time.time() - started, 1),
    }
    if (run_dir / "results.json").exists():
        shutil.copy(run_dir / "results.json", out / "maml_gpu_results.json")
        results = json.loads((run_dir / "results.json").read_text())
        entry |= {"test": results.get("test"), "environment": results.get("environment"), "train": results.get("train")}
    else:
        entry["stderr"] = done.stderr[-2000:]
    record(out, entry)


def smoke() -> None:
    """``--smoke``: the same plumbing on this CPU with tiny settings (no figures)."""
    global MAML, PROTONET, PRECISIONS
    tiny = ["sampler.meta_batch_size=2", "sampler.val_episodes=2", "sampler.test_episodes=2", "model.hidden=8"]
    MAML = [*(o.replace("hardware=gpu", "hardware=cpu") for o in MAML), *tiny]
    PROTONET = [*(o.replace("hardware=gpu", "hardware=cpu") for o in PROTONET), *tiny]
    PRECISIONS = {"fp32": PRECISIONS["fp32"]}


if __name__ == "__main__":
    if "--smoke" in sys.argv:
        smoke()
    main(Path([a for a in sys.argv[1:] if a != "--smoke"][0]))
