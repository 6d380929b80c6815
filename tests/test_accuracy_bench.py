"""The accuracy benchmark runs on a product root it has never seen and reports every figure."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import TINY_CONFIG

from moleflow_edge.data.synth import generate

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_accuracy_bench_on_an_unseen_root(tmp_path: Path) -> None:
    root = tmp_path / "data"
    generate(root, ["weave"], seed=3, image_size=96, n_train=12, n_test_good=6, n_test_defect=2)
    generate(root, ["cap"], seed=4, image_size=96, n_train=4, n_test_good=4, n_test_defect=2)  # a smoke product
    config = tmp_path / "config.json"
    TINY_CONFIG.with_overrides(image_size=96, augment_copies=1).with_settings("flow", max_steps=8).to_json(config)
    out = tmp_path / "out"
    done = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "accuracy_bench.py"), "--data", str(root), "--config", str(config),
         "--out", str(out), "--detector", "memory"],
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    result = json.loads((out / "accuracy.json").read_text())
    assert set(result["products"]) == {"cap", "weave"}
    assert result["detectors"] == ["flow", "memory"]
    assert result["mean_over"] == ["weave"]  # 4 training images: reported, out of the means
    for row in result["products"].values():
        for name in ("flow", "memory", "knn", "gaussian"):
            for key in ("image_auroc", "pixel_auroc", "pixel_ap", "aupro", "x0.9", "x1.1"):
                assert 0.0 <= row[name][key] <= 1.0, (name, key, row[name])
        for kind in ("flow", "memory"):
            assert row[kind]["routing_accuracy"] == 1.0
            assert row[kind]["graph_ms"] > 0 and row[kind]["task_file_mib"] > 0
            for q in (95, 90, 75):
                assert 0.0 <= row[kind][f"q{q}"] <= 1.0 and 0 <= row[kind][f"q{q}_unknown"] <= row[kind]["good"]
    assert result["mean"]["knn"]["image_auroc"] == result["products"]["weave"]["knn"]["image_auroc"]
    table = (out / "accuracy.md").read_text()
    assert "| cap | knn |" in table and "| weave | memory |" in table
    assert (
        "| **all** | memory | "
        + " | ".join(  # the JPEG table's totals count every product's good images
            f"{result['mean']['memory'][f'q{q}_unknown']} of 10" for q in (95, 90, 75)
        )
        in table
    )


@pytest.mark.slow
def test_router_jpeg_bench_on_an_unseen_root(tmp_path: Path) -> None:
    """It calls train's own router features, so it breaks the day they change shape, not months later."""
    root = tmp_path / "data"
    for seed, product in enumerate(("weave", "cap", "screw")):
        generate(root, [product], seed=seed, image_size=96, n_train=8, n_test_good=3, n_test_defect=2)
    config = tmp_path / "config.json"
    TINY_CONFIG.with_overrides(image_size=96).to_json(config)
    out = tmp_path / "out"
    done = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "router_jpeg_bench.py"), "--data", str(root), "--config", str(config),
         "--out", str(out)],
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    result = json.loads((out / "router_jpeg.json").read_text())
    for fit in ("png only", "with jpeg"):
        for product in ("cap", "screw", "weave"):
            known, left = result["known"][fit][product], result["left_out"][fit][product]
            assert known["good"] == 3 and known["png"] == 0  # every product's own PNG frames are routed to it
            assert 0 <= known["q75"] <= 3 and left["frames"] == known["good"] + known["defective"]
            assert left["closest"] > 0 and 0 <= left["unknown"] <= left["frames"]
    assert "| with jpeg | **all** | 9 |" in (out / "router_jpeg.md").read_text()
