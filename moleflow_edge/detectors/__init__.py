"""Detector kinds: one package per kind (flow/, memory/), each holding its parts, fit, scorer and
settings behind one interface (base.py). DetectorKind (config.py) registers them, one line each;
registry.py finds a kind's implementation from its name. Nothing is imported here, so a kind's
settings (torch-free) can be read without loading torch."""
