"""The demo runs the whole path and ends by saying where its results, maps and charts are."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest

from moleflow_edge.atomic import OutputError
from moleflow_edge.demo import FULL, QUICK, TASKS, UNSEEN, run_demo
from moleflow_edge.device import choose_threads

# the whole path at test size: what the demo does, not how well
TEST_PLAN = replace(
    QUICK,
    config=QUICK.config.with_overrides(image_size=64, embed_dim=32, augment_copies=0).with_settings(
        "flow", num_mole_blocks=2, num_dia_blocks=1, lora_rank=4, lora_alpha=4.0
    ),
    steps=2,
    n_train=4,
    n_test_good=5,
    n_test_defect=1,
    backends=("onnxruntime-cpu",),
    bench_iters=1,
    task_counts=(),
)


def test_quick_plan_is_the_smaller_one() -> None:
    assert QUICK.n_train < FULL.n_train and QUICK.steps < FULL.steps
    assert QUICK.config.augment_copies < FULL.config.augment_copies
    assert QUICK.backends is not None and FULL.backends is None  # --full benches every target
    assert max(QUICK.task_counts) < max(FULL.task_counts)


@pytest.mark.parametrize(
    ("requested", "load", "expected"), [(None, 0.3, None), (None, 5.0, 1), (2, 5.0, 2), (1, 0.3, 1)]
)
def test_a_busy_machine_gets_one_torch_thread(
    monkeypatch: pytest.MonkeyPatch, requested: int | None, load: float, expected: int | None
) -> None:
    monkeypatch.setattr("os.cpu_count", lambda: 2)
    monkeypatch.setattr("os.getloadavg", lambda: (load, load, load))
    threads, note = choose_threads(requested)
    assert threads == expected
    assert (note is not None) == (requested is None and load >= 1.0)


@pytest.mark.slow
def test_demo_runs_the_whole_path(tmp_path: Path) -> None:
    lines: list[str] = []
    outputs = run_demo(tmp_path / "demo", TEST_PLAN, printer=lines.append)

    results = json.loads(outputs.eval_json.read_text())
    assert list(results["tasks"]) == list(TASKS)
    assert [t["name"] for t in json.loads((outputs.export / "manifest.json").read_text())["tasks"]] == list(TASKS)
    assert json.loads(outputs.bench_json.read_text())["results"]
    overlays = sorted(outputs.maps.glob("*.png"))
    frames = [json.loads(line) for line in outputs.run_jsonl.read_text().splitlines()]
    assert len(overlays) == len(frames) - 1 == 3 * 3 + 1  # 1 good + 2 defective per product, 1 unseen
    assert any(UNSEEN in f.get("source", "") for f in frames)

    summary = outputs.summary()
    for path in (outputs.eval_json, outputs.bench_json, outputs.maps, outputs.model, outputs.export):
        assert str(path) in summary
    assert "charts" in summary and "results" in summary and "maps" in summary
    assert any(line.startswith("[") and "trained cap" in line for line in lines)  # per-stage times

    with pytest.raises(OutputError, match="already holds a model"):  # never trains over a model
        run_demo(outputs.out, TEST_PLAN, printer=lines.append)
