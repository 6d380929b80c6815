"""The model directory's older forms, read as the current one (SERVES): the task list and config defaults.

Signatures play no part here (a model directory is not signed); each reader of MODEL/ (model_store.py)
passes what it read through this module first.

Version 1 (toolkit 0.1.0 and before): tasks.json has no ``format_version``; without ``detectors``
(saved before memory tasks) every task is a flow. A config.json saved before a field existed was
built with that field's value in CONFIG_SAVED_BEFORE_FIELD, where the field's default has changed
since, and one saved before sections holds every kind's fields at its top level (the flat form,
which older --config files use too): upgrade_config reads both as the current form.
Version 2 (this toolkit): tasks.json is {"format_version": 2, "tasks": [...], "detectors": {task: kind}}.
Task files keep the same tensors in both versions; some stay optional in version 2 and read as None
where absent (router.images, router.patch_level: tasks trained before they were recorded, whose
exported router files lack the level too; a memory bank without inverted lists is searched exactly).
"""

from __future__ import annotations

import copy
from dataclasses import fields

from moleflow_edge.config import DetectorKind, settings_class
from moleflow_edge.migrations import FormatVersionError

__all__ = ["CONFIG_SAVED_BEFORE_FIELD", "SERVES", "nest_flat_fields", "upgrade_config", "upgrade_task_list"]

SERVES = 2  # the model directory format version this module upgrades to (tasks.json's format_version)
CONFIG_SAVED_BEFORE_FIELD = {"spatial_context": True}  # what a config without the field was built with


def upgrade_task_list(data: object) -> dict:
    """tasks.json's object, of any version this toolkit reads, in version SERVES (a new dict); TypeError
    for one that is no task list, FormatVersionError for a version this toolkit does not read."""
    if not isinstance(data, dict) or not isinstance(data.get("tasks"), list):
        raise TypeError("it holds no list of tasks")
    version = data.get("format_version", 1)
    if version == SERVES and not isinstance(version, bool):
        return data
    if version != 1 or isinstance(version, bool):
        raise FormatVersionError(f"has format version {version!r}; this toolkit reads versions 1, {SERVES}: "
                                 "train it again with this toolkit")  # fmt: skip
    data = copy.deepcopy(data)
    saved = data.get("detectors", {})
    if not isinstance(saved, dict):
        raise TypeError(f"detectors must map tasks to kinds, got {saved!r}")
    data["detectors"] = {t: saved.get(t, DetectorKind.FLOW.value) for t in data["tasks"]}
    data["format_version"] = SERVES
    return data


def nest_flat_fields(data: dict[str, object]) -> dict[str, object]:
    """A config in the flat form of files written before sections (every kind's fields at the top
    level, as older model directories' config.json and older --config files are) read into the
    sectioned form: each top-level field of a kind's settings moves into that kind's section, where
    the section does not set it already. A sectioned config comes back unchanged."""
    data = dict(data)
    for kind in DetectorKind:
        names = {f.name for f in fields(settings_class(kind))}
        flat = {name: data.pop(name) for name in sorted(names & set(data))}
        if flat:
            section = data.get(kind.value, {})
            data[kind.value] = {**flat, **section} if isinstance(section, dict) else section
    return data


def upgrade_config(data: dict) -> dict:
    """A model directory's config.json, of any version this toolkit reads, in the current form: the
    fields it lacks take what it was built with (CONFIG_SAVED_BEFORE_FIELD), and a flat file nests."""
    return nest_flat_fields({**CONFIG_SAVED_BEFORE_FIELD, **data})
