"""The Python-backend models of `export --format triton`'s repository, copied there as ``<model>/1/model.py``.

They run inside a full Triton server's Python backend, where ``triton_python_backend_utils`` exists
and moleflow-edge is installed (``pip install 'moleflow-edge[cpu]'`` in the server's Python); they
import ``triton_python_backend_utils`` only there, in their methods, so that this package imports anywhere.
"""
