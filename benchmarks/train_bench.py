"""Training time per task and per optimiser step on this machine, for three configs.

    python benchmarks/train_bench.py [--steps 10] [--json OUT]

Configs: the tiny test config, the default EfficientNet-Lite0 config (D capped at 152) and the
papers' WideResNet-50-2 config (D = 768, M = 6, r = 64). A config whose pretrained backbone
weights are not on this machine (nothing is downloaded; WideResNet-50-2's usually are not) is
timed with random backbone weights, and the output says so: the arithmetic, and so the time, is
the same. Task 0 trains the shared base too and task 1 only its adapters, so both are timed.
Each task runs exactly --steps optimiser steps of batch_size images: the hold-out is switched off
(holdout_fraction 0) so that no held-out check is timed and no early stop cuts the run short.
Seconds per step = training seconds / steps run (backbone features are reported apart). The
"max-steps task" column is features + the config's max_steps x s/step: an upper bound, since
held-out stopping usually ends a real task sooner. The per-step ratio against the tiny config,
measured in the same run, is what to compare across machines (this one is shared and noisy).
"""

from __future__ import annotations

import argparse
import json
import platform
import tempfile
from pathlib import Path

from moleflow_edge.backbones import WeightsError, weights_file
from moleflow_edge.config import MoleFlowConfig
from moleflow_edge.data.synth import generate
from moleflow_edge.train import train_task

CONFIGS = {
    "tiny-test": MoleFlowConfig(image_size=128, embed_dim=64).with_settings(
        "flow", num_mole_blocks=2, num_dia_blocks=1, lora_rank=8, lora_alpha=8.0, batch_size=8
    ),
    "lite0-default": MoleFlowConfig(),
    "wrn50-papers": MoleFlowConfig(backbone="wide_resnet50_2"),
}
IMAGES_PER_TASK = 64  # a small MVTec category has 60-200 training images


def missing_weights(config: MoleFlowConfig) -> str | None:
    """Why ``config``'s pretrained backbone weights cannot be loaded here, or None when they can."""
    try:
        weights_file(config)
    except WeightsError as exc:
        return str(exc)
    return None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=10, help="optimiser steps timed per task")
    parser.add_argument("--json", type=Path, help="write the results here")
    args = parser.parse_args()

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name, config in CONFIGS.items():
            config = config.with_overrides(holdout_fraction=0.0)  # time every step, no held-out checks
            data = Path(tmp) / f"data{config.image_size}"
            if not data.exists():
                generate(data, ["weave", "cap"], seed=0, image_size=config.image_size, n_train=IMAGES_PER_TASK,
                         n_test_good=1, n_test_defect=1)  # fmt: skip
            missing = missing_weights(config)
            if missing is not None:
                print(f"{name}: timed with random backbone weights (same arithmetic, same time): {missing}")
            random_backbone = missing is not None
            for index, task in enumerate(["weave", "cap"]):
                report = train_task(data, task, Path(tmp) / name, config if index == 0 else None, args.steps,
                                    progress=False, random_backbone=random_backbone)  # fmt: skip
                steps, max_steps = report.metrics["steps"], config.section("flow").max_steps
                seconds_per_step = report.train_seconds / steps
                rows.append({
                    "config": name, "task_index": index, "images": report.images, "random_backbone": random_backbone,
                    "steps": steps, "seconds_per_step": seconds_per_step,
                    "feature_seconds": report.feature_seconds, "max_steps": max_steps,
                    "seconds_per_task_max_steps": report.feature_seconds + max_steps * seconds_per_step,
                })  # fmt: skip
    base = {r["task_index"]: r["seconds_per_step"] for r in rows if r["config"] == "tiny-test"}
    print(f"machine: {platform.processor() or platform.machine()}, {platform.system()}; {IMAGES_PER_TASK} images/task")
    print(f"{'config':<16}{'task':>5}{'s/step':>10}{'x tiny':>8}{'features s':>12}{'max-steps task s':>17}")
    for r in rows:
        ratio = r["seconds_per_step"] / base[r["task_index"]]
        print(f"{r['config']:<16}{r['task_index']:>5}{r['seconds_per_step']:>10.3f}{ratio:>8.1f}"
              f"{r['feature_seconds']:>12.1f}{r['seconds_per_task_max_steps']:>17.0f}")  # fmt: skip
    if args.json:
        args.json.write_text(json.dumps({"machine": platform.uname()._asdict(), "results": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()
