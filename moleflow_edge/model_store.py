"""The model directory: config, shared weights, one file per task, and the task list.

    MODEL/config.json             MoleFlowConfig (all sizes: the shared fields, one section per detector kind)
    MODEL/shared.safetensors      shared weights, written once after task 0
    MODEL/tasks/<task>.safetensors  one task's own parts (of its kind: flow adapters, a memory bank) + router prototype
    MODEL/tasks.json              {"format_version": 2, "tasks": [...], "detectors": {task: kind}}, in
                                  training order (older forms: migrations/model_dir.py)

Every file is written to a temporary name and renamed into place, and the task list is
written last: a crash at any point leaves the tasks listed before it loadable and unchanged,
and the temporary files of a killed save are swept by the next one.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from moleflow_edge.atomic import sweep_stale_temps, write_atomic, write_text_atomic
from moleflow_edge.backbones import build_backbone
from moleflow_edge.config import DetectorKind, MoleFlowConfig
from moleflow_edge.contract import TaskEntry
from moleflow_edge.detectors.registry import build_model, kind_of
from moleflow_edge.errors import UserError
from moleflow_edge.migrations import FormatVersionError
from moleflow_edge.migrations.model_dir import SERVES as TASK_LIST_VERSION
from moleflow_edge.migrations.model_dir import upgrade_config, upgrade_task_list
from moleflow_edge.model.continual_model import ContinualModel
from moleflow_edge.router import Prototype, RouterTable
from moleflow_edge.runtime.spec import RuntimeSpec

CONFIG_FILE = "config.json"
SHARED_FILE = "shared.safetensors"
TASK_LIST_FILE = "tasks.json"
TASK_DIR = "tasks"
ROUTER_PREFIX = "router."


class ModelDirError(UserError):
    """A model directory that is missing, incomplete or inconsistent."""


class ModelStore:
    """Reads and writes one model directory."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)

    def task_file(self, task: str) -> Path:
        return self.root / TASK_DIR / f"{task}.safetensors"

    def tasks(self) -> list[str]:
        """Trained tasks in order; [] for a new or never-completed directory."""
        return list(self._task_list()[0])

    def kinds(self) -> dict[str, DetectorKind]:
        """Each trained task's detector kind."""
        return self._task_list()[1]

    def _task_list(self) -> tuple[list[str], dict[str, DetectorKind]]:
        path = self.root / TASK_LIST_FILE
        if not path.is_file():
            return [], {}
        try:
            data = upgrade_task_list(json.loads(path.read_text()))
            tasks = list(data["tasks"])
            return tasks, {t: DetectorKind(data["detectors"][t]) for t in tasks}
        except FormatVersionError as exc:
            raise ModelDirError(f"{path} {exc}") from exc
        except (json.JSONDecodeError, KeyError, TypeError, ValueError, AttributeError) as exc:
            raise ModelDirError(f"{path} is not a valid task list: {exc}") from exc

    def config(self) -> MoleFlowConfig:
        path = self.root / CONFIG_FILE
        if not path.is_file():
            raise ModelDirError(f"{path} is missing: {self.root} is not a trained model directory")
        return MoleFlowConfig.from_json(path, upgrade=upgrade_config)

    def load(
        self, tasks: list[str] | None = None, random_backbone: bool = False
    ) -> tuple[ContinualModel, dict[str, Prototype]]:
        """Rebuild the model with the listed tasks and their prototypes.

        Args:
            tasks: the tasks to keep (None: every trained task); the others are removed after loading.
            random_backbone: random backbone weights (tests and timings only).

        Returns:
            The model, in eval mode on the CPU, and each kept task's router prototype.
        """
        trained, kinds = self._task_list()
        if not trained:
            raise ModelDirError(f"{self.root} holds no trained task (no {TASK_LIST_FILE}); train one first")
        wanted = trained if tasks is None else tasks
        unknown = [t for t in wanted if t not in trained]
        if unknown:
            raise ModelDirError(f"tasks {unknown} are not in {self.root} (trained: {trained})")
        config = self.config()
        model = build_model(config, build_backbone(config, random_backbone))
        state = self._read(self.root / SHARED_FILE)
        prototypes = {}
        for task in trained:  # every task in order, so that later tasks start from the same task-0 values
            model.add_task(task, kind_of(kinds[task]))
            task_state = self._read(self.task_file(task))
            prototypes[task] = _prototype_from(task_state, self.task_file(task))
            state.update({k: v for k, v in task_state.items() if not k.startswith(ROUTER_PREFIX)})
        missing, unexpected = model.load_state_dict(state, strict=False)
        missing = [k for k in missing if not k.startswith("backbone.")]
        if missing or unexpected:
            raise ModelDirError(
                f"{self.root}: weights do not fit the config: missing {missing[:3]}, unexpected {unexpected[:3]}"
            )
        for task in trained:
            if task not in wanted:
                model.remove_task(task)
        model.eval()
        return model, {t: prototypes[t] for t in wanted}

    def save_task(self, model: ContinualModel, task: str, prototype: Prototype) -> None:
        """Add a trained task: config and shared weights with the first task, the task file, then the list."""
        tasks, kinds = self._task_list()
        if task in tasks:
            raise ModelDirError(f"task {task!r} is already in {self.root}")
        for folder in (self.root, self.root / TASK_DIR):  # left by a save that was killed (we hold the lock)
            sweep_stale_temps(folder)
        if not tasks:
            write_atomic(self.root / CONFIG_FILE, model.config.to_json)
            shared = {k: v.contiguous() for k, v in model.shared_state_dict().items()}
            write_atomic(self.root / SHARED_FILE, lambda tmp: save_file(shared, str(tmp)))
        state = {k: v.contiguous() for k, v in model.task_state_dict(task).items()}
        state[ROUTER_PREFIX + "mean"] = torch.from_numpy(prototype.mean)
        state[ROUTER_PREFIX + "whitener"] = torch.from_numpy(prototype.whitener)
        state[ROUTER_PREFIX + "limit"] = torch.tensor(prototype.limit, dtype=torch.float64)
        if prototype.images is not None:
            state[ROUTER_PREFIX + "images"] = torch.tensor(prototype.images, dtype=torch.int64)
        if prototype.patch_level is not None:
            state[ROUTER_PREFIX + "patch_level"] = torch.tensor(prototype.patch_level, dtype=torch.float64)
        write_atomic(self.task_file(task), lambda tmp: save_file(state, str(tmp)))
        kinds = {**kinds, task: model.kind(task)}
        listed = {"format_version": TASK_LIST_VERSION, "tasks": [*tasks, task], "detectors": kinds}
        write_text_atomic(self.root / TASK_LIST_FILE, json.dumps(listed, indent=2) + "\n")

    def spec(self, prototypes: dict[str, Prototype]) -> RuntimeSpec:
        """What the Runtime needs of this directory, given the ``prototypes`` ``load`` returned (in its
        tasks): in learning order, each task's kind, no thresholds (calibrate sets them on an export), the router."""
        config, kinds = self.config(), self.kinds()
        tasks = [t for t in self.tasks() if t in prototypes]
        router = RouterTable(tasks, [prototypes[t] for t in tasks], [kinds[t] for t in tasks])
        entries = tuple(TaskEntry(t, detector=kinds[t], distance_limit=prototypes[t].limit) for t in tasks)
        return RuntimeSpec(entries, config.image_size, config.map_sigma, router)

    @staticmethod
    def _read(path: Path) -> dict[str, torch.Tensor]:
        if not path.is_file():
            raise ModelDirError(f"{path} is missing; the model directory is incomplete")
        try:
            return load_file(str(path))
        except Exception as exc:  # safetensors raises its own error types for damaged files
            raise ModelDirError(f"{path} is damaged: {exc}") from exc


def _prototype_from(state: dict[str, torch.Tensor], path: Path) -> Prototype:
    level = state.get(ROUTER_PREFIX + "patch_level")
    try:
        return Prototype(
            mean=state[ROUTER_PREFIX + "mean"].numpy().astype(np.float32),
            whitener=state[ROUTER_PREFIX + "whitener"].numpy().astype(np.float32),
            limit=float(state[ROUTER_PREFIX + "limit"]),
            images=int(state[ROUTER_PREFIX + "images"]) if ROUTER_PREFIX + "images" in state else None,
            patch_level=None if level is None else tuple(level.tolist()),
        )
    except KeyError as exc:
        raise ModelDirError(f"{path} has no router prototype ({exc})") from exc
