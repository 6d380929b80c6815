"""MoLE-Flow in PyTorch: embedding, LoRA coupling flow, per-task adapters, scores, loss."""
