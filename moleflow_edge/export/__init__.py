"""Export: merge base + LoRA per task, write ONNX graphs, TensorRT engines and the manifest."""
