"""One small trained + exported model (fp32 and int8) shared by the calibration and bench tests.

Built once per test session by conftest's ``built`` fixture, so every test file that needs an
export pays for one training run between them.
"""

from __future__ import annotations

from pathlib import Path

from moleflow_edge.data.synth import generate

TASKS = ["weave", "tiles"]
N_TEST_GOOD = 24  # enough normal images for a 10 % FPR threshold (needs ceil(1/0.1) = 10)


def build_export(base: Path) -> dict:
    """data root, model dir and export dir under ``base`` (fp32 + int8 graphs)."""
    from moleflow_edge.export.exporter import export_model
    from moleflow_edge.train import train_task
    from tests.conftest import TINY_CONFIG

    data, model_dir, export_dir = base / "data", base / "model", base / "export"
    generate(data, TASKS, seed=1, image_size=128, n_train=30, n_test_good=N_TEST_GOOD, n_test_defect=3)
    for task in TASKS:
        train_task(data, task, model_dir, TINY_CONFIG, steps=12, progress=False)
    export_model(model_dir, export_dir, precisions=("fp32", "int8"), calib_data=data)
    return {"data": data, "model_dir": model_dir, "export_dir": export_dir}


def normal_subset(data: Path, root: Path, count: int) -> Path:
    """A dataset root under ``root`` holding only the first ``count`` test/good images of each task."""
    import shutil

    for task in TASKS:
        good = root / task / "test" / "good"
        good.mkdir(parents=True)
        for path in sorted((data / task / "test" / "good").glob("*.png"))[:count]:
            shutil.copy(path, good / path.name)
    return root
