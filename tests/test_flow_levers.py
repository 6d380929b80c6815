"""The flow-levers benchmark runs on a product root it has never seen and fuses the flows it learned."""

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
def test_flow_levers_on_an_unseen_root(tmp_path: Path) -> None:
    root = tmp_path / "data"
    generate(root, ["weave"], seed=3, image_size=96, n_train=12, n_test_good=6, n_test_defect=2)
    config = tmp_path / "config.json"
    TINY_CONFIG.with_overrides(image_size=96, augment_copies=1).with_settings("flow", max_steps=8).to_json(config)
    out = tmp_path / "out"
    done = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "flow_levers.py"), "--data", str(root), "--config", str(config),
         "--flows", "default,spatial context,aggregation 1 (none)", "--out", str(out)],
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    result = json.loads((out / "levers.json").read_text())
    fused = ["default + spatial context, max", "default + spatial context, mean"]
    expected = ["knn", "gaussian", "knn, aggregation 1", "gaussian, aggregation 1", "default", "spatial context",
                "aggregation 1 (none)", *fused]  # fmt: skip
    assert list(result["mean"]) == expected  # per map needs both map flows: not fused here
    for row in result["products"].values():
        for key in ("image_auroc", "pixel_auroc", "pixel_ap", "aupro", "x0.9", "x1.1"):
            assert 0.0 <= row["weave"][key] <= 1.0, (key, row)
    ms = result["graph_ms"]
    assert ms["default"] > 0 and ms["spatial context"] > 0
    assert ms[fused[0]] == ms["default"] + ms["spatial context"]  # a fused detector runs both graphs
    assert "| default + spatial context, max |" in (out / "levers.md").read_text()
