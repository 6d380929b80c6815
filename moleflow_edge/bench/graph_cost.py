"""What an export costs before it runs: its files on disk and the multiply-accumulates of its graphs.

FLOPs are counted from the ONNX graphs' inferred shapes, so the count is the graph the runtime
runs, not the torch module it came from; the achieved share of the machine's peak comes from
the benchmark's own stage times, against a peak measured the way those stages run
(machine.onnxruntime_peak) and never below a stage's own rate.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from moleflow_edge.bench.machine import Peak
from moleflow_edge.contract import ArtifactFile, Manifest, Precision


def _artifact_mb(root: Path, artifacts: Sequence[ArtifactFile | None]) -> float:
    total = 0
    for artifact in artifacts:
        if artifact is None:
            continue
        for name, _ in artifact.paths():
            total += (root / name).stat().st_size
    return total / 2**20


def export_size_mb(root: Path, manifest: Manifest, precision: str) -> float | None:
    """MiB of the backbone, router and every task's graph in ``precision``; None when not exported."""
    if precision not in manifest.backbone_graphs:
        return None
    listed = [manifest.backbone_graphs[precision], manifest.router_file]
    listed += [t.graphs.get(precision) for t in manifest.tasks]
    return round(_artifact_mb(root, listed), 2)


def graph_macs(path: Path) -> dict[str, int]:
    """Multiply-accumulates per op type (Conv, MatMul, Gemm) of one image (batch 1), from inferred shapes.

    Conv: output elements x (C_in / groups) x kernel area; MatMul/Gemm: output elements x K.
    """
    import onnx
    from onnx import shape_inference

    model = onnx.load(str(path), load_external_data=False)
    for graph_input in model.graph.input:  # pin the batch dimension to 1
        dims = graph_input.type.tensor_type.shape.dim
        if dims and not dims[0].HasField("dim_value"):
            dims[0].dim_value = 1
    model = shape_inference.infer_shapes(model)
    shapes: dict[str, list[int]] = {}
    for value in [*model.graph.value_info, *model.graph.input, *model.graph.output]:
        dims = value.type.tensor_type.shape.dim
        shapes[value.name] = [d.dim_value if d.HasField("dim_value") else 1 for d in dims]
    for init in model.graph.initializer:
        shapes[init.name] = list(init.dims)
    macs = {"Conv": 0, "MatMul": 0, "Gemm": 0}
    for node in model.graph.node:
        if node.op_type not in macs or node.output[0] not in shapes:
            continue
        out = shapes[node.output[0]]
        weight = shapes.get(node.input[1])
        if weight is None:
            continue
        if node.op_type == "Conv":
            macs["Conv"] += int(np.prod(out)) * int(np.prod(weight[1:]))  # weight (C_out, C_in/g, kh, kw)
        elif node.op_type == "MatMul":
            macs["MatMul"] += int(np.prod(out)) * int(weight[-2] if len(weight) >= 2 else weight[0])
        else:
            trans_b = next((a.i for a in node.attribute if a.name == "transB"), 0)
            macs["Gemm"] += int(np.prod(out)) * int(weight[1] if trans_b else weight[0])
    return macs


def flop_report(
    root: Path, manifest: Manifest, stage_ms: dict[str, float] | None, measured: Peak | None
) -> tuple[list[dict], dict | None]:
    """FLOPs per fp32 graph (2 x MACs, batch 1) and, where timed, the achieved GFLOP/s as a share of the peak;
    and that peak: ``measured`` (a MatMul graph run as the graphs run), or a stage's own rate where a stage
    ran faster than it, saying so, so that no share is above 100 %."""
    try:
        import onnx  # noqa: F401
    except ImportError:
        return [{"graph": "*", "note": "onnx is not installed (pip install onnx): no FLOP count"}], None
    fp32 = Precision.FP32
    graphs = [("backbone", "backbone", manifest.backbone_graphs.get(fp32))]  # (graph, its stage, file)
    graphs += [(f"detectors/{t.name}", "detector", t.graphs.get(fp32)) for t in manifest.tasks[:1]]
    rows = []
    for name, stage, artifact in graphs:
        if artifact is None:
            continue
        macs = graph_macs(root / artifact.file)
        gflop = 2 * sum(macs.values()) / 1e9
        row: dict = {"graph": name, "macs": macs, "gflop": round(gflop, 4)}
        ms = None if stage_ms is None else stage_ms.get(stage)
        if ms:
            row["measured_ms"] = round(ms, 3)
            row["achieved_gflops"] = gflop / (ms / 1e3)
        rows.append(row)
    timed = [r for r in rows if "achieved_gflops" in r]
    if measured is None or not timed:
        return rows, None
    fastest = max(timed, key=lambda r: r["achieved_gflops"])
    peak = {"gflops": measured.gflops, "measured_with": measured.measured_with, "note": None}
    if fastest["achieved_gflops"] > measured.gflops:
        peak["gflops"] = fastest["achieved_gflops"]
        peak["note"] = (f"{fastest['graph']} ran at {fastest['achieved_gflops']:.1f} GFLOP/s, above the MatMul's "
                        f"{measured.gflops:.1f}: the peak is the faster of the two")  # fmt: skip
    for row in timed:
        row["fraction_of_peak"] = round(row["achieved_gflops"] / peak["gflops"], 4)
        row["achieved_gflops"] = round(row["achieved_gflops"], 2)
    peak["gflops"] = round(peak["gflops"], 2)
    return rows, peak
