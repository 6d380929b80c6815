"""`moleflow-edge bench`: every backend x precision x batch on one export, one table, one JSON.

Per combination: per-stage latency percentiles (preprocess, backbone, routing, detector,
postprocess) and end-to-end, throughput, peak RSS, image AUROC on the dataset's labelled
test images (when ``data_root`` is given); backends that cannot run here are listed under
``skipped`` with the reason. Also: FLOPs per graph against a machine peak measured in the
same run as the graphs run (an onnxruntime MatMul graph, same threads and session options, best
of several runs; never below a stage's own rate, so no share is above 100 %), and how routing
time, memory and engine load time grow with the task count.

Torch is imported only for the torch-eager backend; everything else runs on the runtime.
The ultralytics habit: one printed table (backend, precision, status, size, metric, ms per
image, FPS), and a metric floor that turns the benchmark into a regression check.

  run.py          bench(): the whole benchmark and its report
  pipelines.py    the pipelines under test (eager PyTorch, the runtime) and which a backend name makes
  measure.py      test frames, timing percentiles and end-to-end image AUROC
  machine.py      this machine: CPU flags, its fp32 peak GFLOP/s measured in onnxruntime, resident memory
  graph_cost.py   an export's size on disk and multiply-accumulates per graph
  task_growth.py  routing time, memory and load time against the task count
  tables.py       the printed tables and the latency chart
"""
