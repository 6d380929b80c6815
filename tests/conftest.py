"""Shared fixtures: one small synthetic dataset and a tiny config, reused across test files."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from moleflow_edge.config import DetectorKind, MoleFlowConfig
from moleflow_edge.data.synth import generate
from tests.export_fixture import build_export

SYNTH_CATEGORIES = ["weave", "tiles", "screw", "cap"]
# small enough for CI on two CPU cores, big enough to separate the synthetic defects
TINY_CONFIG = MoleFlowConfig(image_size=128, embed_dim=64, augment_copies=0).with_settings(
    DetectorKind.FLOW, num_mole_blocks=2, num_dia_blocks=1, lora_rank=8, lora_alpha=8.0, max_steps=48, batch_size=8
)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Mark slow every test that uses one of this suite's module- or session-wide fixtures: they exist
    because they train, export or start a server once for many tests. Tests that do so in their own
    body carry ``@pytest.mark.slow`` themselves."""
    for item in items:
        info = getattr(item, "_fixtureinfo", None)
        if info is None:
            continue
        shared = (info.name2fixturedefs.get(name, [None])[-1] for name in info.names_closure)
        if any(d is not None and d.baseid and d.scope != "function" for d in shared):  # baseid "": pytest's own
            item.add_marker(pytest.mark.slow)


@pytest.fixture(scope="session")
def synth_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("synth")
    generate(root, SYNTH_CATEGORIES, seed=0, image_size=128, n_train=30, n_test_good=8, n_test_defect=3)
    return root


@pytest.fixture(scope="session")
def built(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """One small trained + exported model (fp32 and int8) for every test that needs an export."""
    return build_export(tmp_path_factory.getbasetemp() / "calib_bench_export")


@pytest.fixture
def export_copy(built: dict, tmp_path: Path) -> Path:
    """A private copy of the shared export, for tests that change it."""
    out = tmp_path / "export"
    shutil.copytree(built["export_dir"], out)
    return out
