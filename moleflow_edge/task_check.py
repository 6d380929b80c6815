"""Every check that can refuse a new task, run before any feature extraction or training.

Learning a product takes minutes to hours; a refusal found after that work (too few images,
a read-only model folder, a name already taken) throws it away. These checks only list and hash
the training files and probe the model folder without changing it. Images that cannot be
decoded are refused by the loader, which also runs before the backbone does.
"""

from __future__ import annotations

import hashlib
import tempfile
from pathlib import Path

from moleflow_edge.data.mvtec import DatasetError, train_samples
from moleflow_edge.model.mole_flow import check_task_name
from moleflow_edge.model_store import TASK_DIR, ModelDirError, ModelStore
from moleflow_edge.router import MIN_IMAGES


def check_new_task(data_root: str | Path, task: str, model_dir: str | Path) -> None:
    """Refuse ``task`` now if it could not be added to ``model_dir`` after training.

    Raises ValueError (task name), ModelDirError (task already trained, model folder not
    writable or its task list damaged) or DatasetError (layout, fewer than MIN_IMAGES
    distinct training images), each naming the task, file or folder at fault.
    """
    check_task_name(task)
    store = ModelStore(model_dir)
    if task in store.tasks():
        raise ModelDirError(f"task {task!r} is already trained in {model_dir}; pick a new task name")
    _check_writable(Path(model_dir))
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


def _check_writable(model_dir: Path) -> None:
    """The model folder and its tasks folder, or the nearest folder above that exists, accept new files."""
    existing = [p for p in (model_dir, model_dir / TASK_DIR) if p.exists()]
    if not existing:
        existing = [next(p for p in model_dir.parents if p.exists())]  # the model folder will be created in it
    for folder in existing:
        if not folder.is_dir():
            raise ModelDirError(f"cannot use {model_dir} as a model folder: {folder} is a file; choose another --model")
        try:
            with tempfile.TemporaryFile(dir=folder):
                pass
        except OSError as exc:
            raise ModelDirError(
                f"model folder {folder} is not writable ({exc.strerror}); choose another --model or fix its permissions"
            ) from exc
