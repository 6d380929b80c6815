"""The Python-backend models, copied into a model repository as ``<model>/1/model.py``: the repository's
(`export --format triton`) ``moleflow`` and ``moleflow_info``, and `serve`'s guard ``moleflow``.

They run inside a full Triton server's Python backend, where ``triton_python_backend_utils`` exists
and moleflow-edge is installed (``pip install 'moleflow-edge[cpu]'`` in the server's Python); they
import ``triton_python_backend_utils`` only there, in their methods, so that this package imports anywhere.
"""
