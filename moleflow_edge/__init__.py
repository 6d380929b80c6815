"""moleflow-edge: train, export and run MoLE-Flow continual anomaly detection.

This top-level module stays free of torch so that ``moleflow_edge.runtime``
can be imported on a line PC with only numpy, OpenCV and onnxruntime.
"""

__version__ = "0.1.0"
