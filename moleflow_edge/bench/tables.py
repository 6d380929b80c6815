"""What a benchmark prints and draws: the summary table, the per-stage table and the latency chart."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from moleflow_edge.runtime.result import STAGES

PAPER_LATENCY_MS = 15.0  # the per-image latency target the MoLE-Flow edge papers report


def summary_table(summary: list[dict]) -> str:
    """The ultralytics-style table: backend, precision, status, size, image AUROC, ms/image, FPS."""
    head = f"{'backend':22s} {'precision':9s} {'status':8s} {'size MiB':>9s} {'AUROC':>7s} {'ms/image':>9s} {'FPS':>8s}"
    lines = [head]

    def cell(value: object, spec: str) -> str:
        return "-" if value is None else format(value, spec)

    for r in summary:
        lines.append(
            f"{r['backend']:22s} {r['precision']:9s} {r['status']:8s} {cell(r.get('size_mb'), '9.2f'):>9s} "
            f"{cell(r.get('image_auroc'), '7.4f'):>7s} {cell(r.get('ms_per_image'), '9.2f'):>9s} "
            f"{cell(r.get('fps'), '8.1f'):>8s}"
        )
    lines += [f"skipped {r['backend']} {r['precision']}: {r['reason']}" for r in summary if r.get("reason")]
    return "\n".join(lines)


def markdown_table(results: list[dict]) -> str:
    """Per-stage p50 latency (ms per call) for every backend, precision and batch."""
    lines = [
        "| backend | precision | batch | " + " | ".join(STAGES) + " | end-to-end p50 | p99 | FPS | AUROC |",
        "|---|---|---:|" + "---:|" * (len(STAGES) + 4),
    ]
    for r in results:
        stages = " | ".join(f"{r['stages_ms'][s]['p50']:.2f}" for s in STAGES)
        score = "-" if r["image_auroc"] is None else f"{r['image_auroc']:.4f}"
        lines.append(
            f"| {r['backend']} | {r['precision']} | {r['batch']} | {stages} | {r['end_to_end_ms']['p50']:.2f} "
            f"| {r['end_to_end_ms']['p99']:.2f} | {r['throughput_fps']:.1f} | {score} |"
        )
    return "\n".join(lines)


def save_chart(results: list[dict], path: str | Path) -> str:
    """Stacked per-stage p50 ms per image (batch 1 rows), a line at the papers' 15 ms; a note without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "matplotlib is not installed (pip install matplotlib): no chart written"
    rows = [r for r in results if r["batch"] == min(x["batch"] for x in results)]
    labels = [f"{r['backend']}\n{r['precision']}" for r in rows]
    fig, ax = plt.subplots(figsize=(max(6, 1.4 * len(rows)), 4))
    bottom = np.zeros(len(rows))
    for stage in STAGES:
        values = np.array([r["stages_ms"][stage]["p50"] / r["batch"] for r in rows])
        ax.bar(labels, values, bottom=bottom, label=stage)
        bottom += values
    ax.axhline(PAPER_LATENCY_MS, color="k", linestyle="--", label=f"papers' {PAPER_LATENCY_MS:g} ms")
    ax.set_ylabel("ms per image (p50)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)  # check_writable let a new folder through
    fig.savefig(str(path), dpi=120)
    plt.close(fig)
    return str(path)
