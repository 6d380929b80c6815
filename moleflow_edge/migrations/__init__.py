"""Older forms of the two folder formats, read into the current ones here and nowhere else.

``manifest``: the export manifest (EXPORT/manifest.json); ``model_dir``: the model directory
(MODEL/tasks.json and config.json's defaults). Each module says which version it serves and how each
older version differs, so that a reader elsewhere sees only the current format. Torch-free.
"""


class FormatVersionError(ValueError):
    """A folder written in a format version this toolkit does not read (a newer toolkit's)."""
