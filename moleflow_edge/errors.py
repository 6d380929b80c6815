"""The toolkit's error tree, torch-free: what the command line turns into one line, and what it lets through.

Every exception the toolkit raises on purpose subclasses one of three bases:

- ``UserError``: something the user caused and can fix (data, a manifest, a model folder, a device, an
  output path, a lock, a signature, a frame, a config, an option). The CLI prints it as one ``error:``
  line and exits 2.
- ``EngineError``: an inference engine (onnxruntime, TensorRT, OpenVINO, CUDA) is missing or failed.
- ``LinkError``: a link to the outside world (a source, a camera, a server) broke.

Anything else, a plain ``ValueError`` included, is a bug: the CLI lets it through with its traceback.
"""

from __future__ import annotations


class MoleflowError(Exception):
    """The root of every exception the toolkit raises on purpose."""


class UserError(MoleflowError):
    """Something the user caused and can fix; the message names it in one line."""


class InputError(UserError, ValueError):
    """A value the user gave (an option, a name, a config field, a size) is unknown or out of range.

    Also a ValueError, Python's type for a bad argument value, so library callers that pass such a
    value (Runtime.load's guards, the tests) catch it as they always have."""


class EngineError(MoleflowError):
    """An inference engine is missing here, cannot run this export, or failed while running."""


class LinkError(MoleflowError):
    """A source, camera or server stopped answering, or could not be reached."""
