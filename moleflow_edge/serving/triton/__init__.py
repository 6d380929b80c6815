"""Triton in one place, torch-free: the model repository `export --format triton` writes for a full
Triton (repository.py; its decision files, which ``calibrate`` refreshes: decisions.py), the model
configs both it and `serve` write (configs.py), and the Python-backend models (models/): the BLS
``moleflow`` and ``moleflow_info`` of the repository, and the guard `serve` puts in front of PyTriton."""
