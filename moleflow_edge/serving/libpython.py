"""What PyTriton's Python-backend stub needs from this interpreter: its own shared libpython.

The stub (a process tritonserver starts) loads ``libpython3.X.so.1.0`` by its soname. Where the
system has a libpython of the same minor version (Debian's 3.11.2 beside pyenv's 3.11.7), the loader
finds that one first, and the model fails to load with ``'_thread.RLock' object has no attribute
'_recursion_count'``. Putting the running interpreter's LIBDIR first on LD_LIBRARY_PATH, before
tritonserver starts, makes the stub load the interpreter's own library.
"""

from __future__ import annotations

import importlib.util
import os
import sys
import sysconfig
from pathlib import Path

from moleflow_edge.errors import EngineError

__all__ = ["ServingUnavailable", "interpreter_libpython", "prepare_stub_environment", "serving_problem"]

# the stub's soname for this interpreter: libpython3.11.so.1.0
SONAME = f"libpython{sys.version_info.major}.{sys.version_info.minor}.so.1.0"


class ServingUnavailable(EngineError):
    """Serving cannot work in this Python environment; the message says why and what to do."""


def interpreter_libpython() -> Path | None:
    """The running interpreter's own shared libpython, or None when it was built without one."""
    if not sysconfig.get_config_var("Py_ENABLE_SHARED"):
        return None
    path = Path(str(sysconfig.get_config_var("LIBDIR"))) / SONAME
    return path if path.exists() else None


def serving_problem() -> str | None:
    """Why PyTriton cannot serve from this interpreter (one line), or None when it can."""
    specs = {name: importlib.util.find_spec(name) for name in ("pytriton", "tritonclient")}  # found, not imported
    if missing := [name for name, spec in specs.items() if spec is None]:
        return f"{' and '.join(missing)} not installed: pip install 'moleflow-edge[serve]'"
    if sys.platform != "linux":
        return f"PyTriton's bundled tritonserver runs on Linux only, this is {sys.platform}"
    pytriton = specs["pytriton"]
    assert pytriton is not None and pytriton.submodule_search_locations is not None  # found above, a package
    stubs = Path(next(iter(pytriton.submodule_search_locations))) / "tritonserver" / "python_backend_stubs"
    version = f"{sys.version_info.major}.{sys.version_info.minor}"
    if not (stubs / version).is_dir():
        return f"nvidia-pytriton has no Python-backend stub for Python {version} (it has {_listing(stubs)})"
    if interpreter_libpython() is None:
        return (
            f"this Python ({sys.executable}) has no shared {SONAME}, which tritonserver's Python-backend stub loads: "
            "use a Python built with --enable-shared (pyenv: PYTHON_CONFIGURE_OPTS=--enable-shared pyenv install)"
        )
    return None


def prepare_stub_environment() -> Path:
    """Put the interpreter's LIBDIR first on LD_LIBRARY_PATH (inherited by tritonserver and its stubs);
    returns that folder. Raises ServingUnavailable when serving cannot work here."""
    problem = serving_problem()
    if problem is not None:
        raise ServingUnavailable(problem)
    libpython = interpreter_libpython()
    assert libpython is not None  # serving_problem checked it
    libdir = libpython.parent
    paths = [p for p in os.environ.get("LD_LIBRARY_PATH", "").split(os.pathsep) if p and Path(p) != libdir]
    os.environ["LD_LIBRARY_PATH"] = os.pathsep.join([str(libdir), *paths])
    return libdir


def _listing(folder: Path) -> str:
    return ", ".join(sorted(p.name for p in folder.iterdir())) if folder.is_dir() else "none"
