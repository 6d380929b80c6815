"""Install profiles never put two onnxruntime builds (which share one `onnxruntime` module) in one
environment: not in pyproject's extras, not in any install command the README or CI gives, not in
what is installed here, and not in pip's own resolution of the GPU profile (made by .ci/run)."""

from __future__ import annotations

import itertools
import json
import os
import re
from importlib import metadata
from pathlib import Path

import pytest
import tomllib
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

REPO = Path(__file__).resolve().parents[1]
PYPROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
EXTRAS: dict[str, list[str]] = PYPROJECT["optional-dependencies"]
ONNXRUNTIME = {"onnxruntime", "onnxruntime-gpu", "onnxruntime-openvino", "onnxruntime-directml"}
OPENCV = {"opencv-python", "opencv-python-headless", "opencv-contrib-python", "opencv-contrib-python-headless"}
ENGINES = {"cpu", "gpu", "jetson"}  # exactly one per machine


def names(requirements: list[str]) -> set[str]:
    return {canonicalize_name(Requirement(r).name) for r in requirements}


def profile(extras: set[str]) -> set[str]:
    """Distributions pyproject asks for with these extras (direct requirements)."""
    return names(PYPROJECT["dependencies"]) | {n for e in extras for n in names(EXTRAS[e])}


def documented_profiles() -> dict[str, set[str]]:
    """Every extras set an install command in the README or .ci/run uses."""
    found: dict[str, set[str]] = {}
    for path in (REPO / "README.md", REPO / ".ci" / "run"):
        for match in re.finditer(r"(?:moleflow-edge|[\"']\.)\[([a-z,]+)\]", path.read_text()):
            found[match.group(0)] = set(match.group(1).split(","))
    return found


def test_core_has_no_engine_and_no_opencv_wheel() -> None:
    core = names(PYPROJECT["dependencies"])
    assert not core & ONNXRUNTIME and not core & OPENCV  # each machine brings its own builds of both


def test_no_extra_and_no_pair_of_non_engine_extras_brings_two_onnxruntime_builds() -> None:
    assert names(EXTRAS["cpu"]) & ONNXRUNTIME == {"onnxruntime"}
    assert names(EXTRAS["gpu"]) & ONNXRUNTIME == {"onnxruntime-gpu"}
    assert not names(EXTRAS["jetson"]) & (ONNXRUNTIME | OPENCV | {"tensorrt"})  # JetPack's builds stay visible
    others = set(EXTRAS) - ENGINES
    for extra in others:
        assert not names(EXTRAS[extra]) & ONNXRUNTIME, f"[{extra}] must leave the onnxruntime build to [cpu]/[gpu]"
    for engine, extras in itertools.product(ENGINES, itertools.combinations(sorted(others), 2)):
        assert len(profile({engine, *extras}) & ONNXRUNTIME) <= 1


def test_every_documented_install_holds_at_most_one_engine_build() -> None:
    profiles = documented_profiles()
    assert len(profiles) >= 4, profiles  # CPU line PC, GPU desktop, Jetson, CI at least
    for command, extras in profiles.items():
        assert extras <= set(EXTRAS), f"{command}: unknown extra"
        assert len(extras & ENGINES) <= 1 and len(profile(extras) & ONNXRUNTIME) <= 1, command
        if "train" in extras:  # train, calibrate, demo and tests also run exports: they need an engine
            assert len(extras & ENGINES) == 1, command


def test_floors_that_ci_installs_are_pyproject_lower_bounds() -> None:
    bounds = {}
    for requirement in [*PYPROJECT["dependencies"], *itertools.chain(*EXTRAS.values())]:
        parsed = Requirement(requirement)
        bounds |= {canonicalize_name(parsed.name): s.version for s in parsed.specifier if s.operator == ">="}
    pins = [Requirement(line) for line in (REPO / ".ci" / "floors.txt").read_text().splitlines()
            if line.strip() and not line.startswith("#")]  # fmt: skip
    assert {canonicalize_name(p.name) for p in pins} >= names(PYPROJECT["dependencies"]) | {"onnxruntime"}
    for pin in pins:
        (spec,) = pin.specifier
        assert spec.operator == "==" and spec.version == f"{bounds[canonicalize_name(pin.name)]}.*", pin
    ci = (REPO / ".ci" / "run").read_text()
    assert f"torch=={bounds['torch']}.0" in ci and "floors.txt" in ci


def installed_closure(root: str, extras: set[str]) -> set[str]:
    """Installed distributions reachable from ``root[extras]`` through their requirements."""
    seen: set[str] = set()
    stack = [(canonicalize_name(root), extras)]
    while stack:
        name, wanted = stack.pop()
        if name in seen:
            continue
        try:
            requires = metadata.requires(name) or []
        except metadata.PackageNotFoundError:
            continue  # an optional dependency this environment does not have
        seen.add(name)
        for line in requires:
            req = Requirement(line)
            if req.marker is None or any(req.marker.evaluate({"extra": e}) for e in wanted | {""}):
                stack.append((canonicalize_name(req.name), set(req.extras)))
    return seen


def test_this_environment_resolved_one_onnxruntime_build() -> None:
    provided = set(metadata.metadata("moleflow-edge").get_all("Provides-Extra") or [])
    if "cpu" not in provided:
        pytest.skip("the installed moleflow-edge metadata predates the cpu/gpu extras: pip install -e . again")
    engines = [e for e in ("cpu", "gpu") if installed_closure("moleflow-edge", {e}) & ONNXRUNTIME]
    assert len(engines) == 1, f"profiles whose onnxruntime build is installed: {engines}"
    reached = installed_closure("moleflow-edge", {"train", "test", engines[0]})
    assert len(reached & ONNXRUNTIME) == 1 and len(reached & OPENCV) == 1, reached
    present = {canonicalize_name(d.metadata["Name"]) for d in metadata.distributions()}
    assert len(present & ONNXRUNTIME) == 1, present & ONNXRUNTIME


def test_pip_resolves_the_gpu_profile_to_one_onnxruntime_build() -> None:
    report = os.environ.get("MOLEFLOW_GPU_PROFILE_REPORT")
    if not report:
        pytest.skip(".ci/run sets this: pip install --dry-run --report of .[gpu,train,test] (needs the registry)")
    resolved = {canonicalize_name(item["metadata"]["name"]) for item in json.loads(Path(report).read_text())["install"]}
    assert resolved & ONNXRUNTIME == {"onnxruntime-gpu"} and resolved & OPENCV == {"opencv-python-headless"}
    assert "torch" in resolved and "cuda-python" in resolved
