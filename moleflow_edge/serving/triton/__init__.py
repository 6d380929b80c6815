"""Everything Triton-specific on the serving side: the model in front of `serve`'s PyTriton model,
torch-free. The Python-backend model modules here import ``triton_python_backend_utils`` only in their
methods, so that this package imports anywhere."""
