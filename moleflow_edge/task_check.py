"""Checks that can refuse a new task, run before any feature extraction or training.

Learning a product takes minutes to hours; a refusal found after that work (too few images,
a name already taken) throws it away. These checks only list and hash the training files.
Two checks live where they belong and also run first: the model folder's write lock, taken on
entry to train_task, refuses a folder that cannot be written; images that cannot be decoded are
refused by the loader, which runs before the backbone does.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

from moleflow_edge.data.mvtec import DatasetError, train_samples
from moleflow_edge.model.continual_model import check_task_name
from moleflow_edge.model_store import ModelDirError, ModelStore
from moleflow_edge.router import MIN_IMAGES


def check_new_task(data_root: str | Path, task: str, model_dir: str | Path) -> None:
    """Refuse ``task`` now if it could not be added to ``model_dir`` after training.

    Raises ValueError (task name), ModelDirError (task already trained, task list damaged) or
    DatasetError (layout, fewer than MIN_IMAGES distinct training images), each naming the
    task, file or folder at fault.
    """
    check_task_name(task)
    store = ModelStore(model_dir)
    if task in store.tasks():
        raise ModelDirError(f"task {task!r} is already trained in {model_dir}; pick a new task name")
    samples = train_samples(data_root, task)
    folder = samples[0].path.parent
    first_of: dict[str, Path] = {}
    duplicates = []
    for sample in samples:
        digest = hashlib.sha256(sample.path.read_bytes()).hexdigest()
        if digest in first_of:
            duplicates.append(f"{sample.path.name} = {first_of[digest].name}")
        else:
            first_of[digest] = sample.path
    if len(first_of) < MIN_IMAGES:
        copies = f" ({len(samples)} files, identical copies: {', '.join(duplicates)})" if duplicates else ""
        raise DatasetError(
            f"task {task!r}: {folder} has {len(first_of)} distinct good image{'s' * (len(first_of) != 1)}{copies}; "
            f"a product needs at least {MIN_IMAGES} (its router prototype needs a mean and a spread): add good images"
        )
