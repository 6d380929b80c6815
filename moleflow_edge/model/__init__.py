"""The continual model in PyTorch: the shared embedding, the container of every task's parts of its kind
(continual_model.py), and the one shape every task's scorer takes (scorer.py). The kinds: detectors/."""
