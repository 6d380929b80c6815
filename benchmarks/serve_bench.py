"""Serving throughput and latency: `moleflow-edge serve` (a real tritonserver) against the in-process runtime.

Starts `moleflow-edge serve` in a subprocess on free 127.0.0.1 ports once per batching delay, then for each
frame encoding (raw uint8 or JPEG bytes, decoded on the server) and each number of concurrent clients
(threads, each a RemoteRuntime sending one frame per request, as a camera does) sends a bounded number
of frames and reports frames/s, p50/p99 latency per request and the share of frames whose task and
decision are what the in-process runtime gives the raw frame (JPEG is lossy). In the same run, the
reference: the in-process Runtime on the same frames, one at a time (what `run --export` does), measured
at the start (also in batches of --max-batch) and again just before every served setting, since other
jobs on a shared machine come and go. Every server is stopped at the end.

    python benchmarks/serve_bench.py --export EXPORT --images ROOT/bottle/test,ROOT/wood_surface/test --json serve.json
"""

from __future__ import annotations

import argparse
import json
import tempfile
import threading
import time
from pathlib import Path

import cv2
import numpy as np

from moleflow_edge.runtime import Runtime
from moleflow_edge.runtime.sources import IMAGE_SUFFIXES
from moleflow_edge.serving.client import RemoteRuntime
from moleflow_edge.serving.serve_process import ServeProcess


def load_frames(folders: list[Path], count: int) -> list[np.ndarray]:
    """``count`` frames, cycling over every image of the folders in turn."""
    files = sorted(p for folder in folders for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise SystemExit(f"error: {', '.join(map(str, folders))} hold no image")
    return [cv2.imread(str(files[k % len(files)])) for k in range(count)]


def percentiles(latencies_s: list[float]) -> tuple[float, float]:
    p50, p99 = np.percentile(np.asarray(latencies_s) * 1e3, [50, 99])
    return float(p50), float(p99)


Verdict = tuple[object, object]  # (task, is_anomaly) of one frame


def in_process(export: Path, frames: list[np.ndarray], batch: int) -> tuple[dict[str, float], list[Verdict]]:
    """The reference: Runtime.infer on the same frames, ``batch`` at a time (after one warm-up call);
    also every frame's task and decision."""
    verdicts = []
    with Runtime.load(export) as runtime:
        runtime.infer(frames[:batch], with_maps=False)
        latencies = []
        started = time.perf_counter()
        for start in range(0, len(frames), batch):
            t0 = time.perf_counter()
            results = runtime.infer(frames[start : start + batch], with_maps=False)
            latencies.append(time.perf_counter() - t0)
            verdicts += [(r.task, r.is_anomaly) for r in results]
        wall = time.perf_counter() - started
    p50, p99 = percentiles(latencies)
    return {"frames_per_s": len(frames) / wall, "p50_ms": p50, "p99_ms": p99}, verdicts


def served(
    address: str, frames: list[np.ndarray], want: list[Verdict], clients: int, per_client: int, encoding: str
) -> dict[str, float]:
    """``clients`` threads, each sending ``per_client`` frames one per request (after one warm-up request);
    also the share of frames whose task and decision are ``want``'s (the in-process runtime's on raw frames)."""
    latencies: list[float] = []
    agreed: list[bool] = []
    lock = threading.Lock()
    ready = threading.Barrier(clients + 1)

    def client(number: int) -> None:
        with RemoteRuntime(address, encoding=encoding, retries=1) as remote:
            remote.infer_one(frames[0], with_maps=False)
            ready.wait()
            own, same = [], []
            for k in range(per_client):
                i = (number * per_client + k) % len(frames)
                t0 = time.perf_counter()
                result = remote.infer_one(frames[i], with_maps=False)
                own.append(time.perf_counter() - t0)
                assert result.error is None, result.error
                same.append((result.task, result.is_anomaly) == want[i])
            with lock:
                latencies.extend(own)
                agreed.extend(same)

    threads = [threading.Thread(target=client, args=(n,)) for n in range(clients)]
    for t in threads:
        t.start()
    ready.wait()
    started = time.perf_counter()
    for t in threads:
        t.join()
    wall = time.perf_counter() - started
    p50, p99 = percentiles(latencies)
    return {"frames_per_s": len(latencies) / wall, "p50_ms": p50, "p99_ms": p99, "agree": float(np.mean(agreed))}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--export", type=Path, required=True)
    parser.add_argument("--images", required=True, help="Comma-separated folders of frames (recursive).")
    parser.add_argument("--clients", default="1,4,16")
    parser.add_argument("--delays-us", default="0,2000", help="Triton's max queue delay settings to compare.")
    parser.add_argument("--encodings", default="raw,jpeg")
    parser.add_argument("--frames", type=int, default=128, help="Frames per setting (split over the clients).")
    parser.add_argument("--max-batch", type=int, default=8)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    clients = [int(c) for c in args.clients.split(",")]
    frames = load_frames([Path(p) for p in args.images.split(",")], args.frames)
    jpeg_kb = np.mean([len(cv2.imencode(".jpg", f, [cv2.IMWRITE_JPEG_QUALITY, 90])[1]) for f in frames]) / 1024
    print(f"{len(frames)} frames {frames[0].shape}, raw {frames[0].nbytes / 1024:.0f} KB, JPEG {jpeg_kb:.0f} KB each")

    rows = []
    want: list[Verdict] = []
    for batch in (1, args.max_batch):
        ref, verdicts = in_process(args.export, frames, batch)
        want = want or verdicts
        rows.append({"mode": f"in-process, batch {batch}", "delay_us": None, "encoding": "-", "clients": 1, **ref})
        print(json.dumps(rows[-1]))
    reference = rows[0]["frames_per_s"]
    with tempfile.TemporaryDirectory() as logs:
        for delay in (int(d) for d in args.delays_us.split(",")):
            batching = ("--max-batch", str(args.max_batch), "--max-queue-delay-us", str(delay))
            with ServeProcess(args.export, Path(logs) / f"serve_{delay}.log", *batching) as server:
                for encoding in args.encodings.split(","):
                    for n in clients:
                        # the reference again just before: other jobs on a shared machine come and go
                        ref = in_process(args.export, frames, 1)[0]["frames_per_s"]
                        result = served(server.http, frames, want, n, max(1, args.frames // n), encoding)
                        rows.append({"mode": "serve", "delay_us": delay, "encoding": encoding, "clients": n, **result,
                                     "in_process_frames_per_s": ref})  # fmt: skip
                        print(json.dumps(rows[-1]))

    print(
        "\n| mode | queue delay us | frames sent | clients | frames/s | in-process batch 1 just before, frames/s | ratio "
        "| p50 ms | p99 ms | same task and decision as in-process on raw |"
    )
    print("|---|---:|---|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        ref = r.get("in_process_frames_per_s", reference)
        agree = f"{r['agree']:.3f}" if "agree" in r else "-"
        print(
            f"| {r['mode']} | {r['delay_us'] if r['delay_us'] is not None else '-'} | {r['encoding']} | {r['clients']} | "
            f"{r['frames_per_s']:.1f} | {ref:.1f} | {r['frames_per_s'] / ref:.2f} | {r['p50_ms']:.1f} | {r['p99_ms']:.1f} "
            f"| {agree} |"
        )
    if args.json:
        args.json.write_text(json.dumps({"frames": len(frames), "rows": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()
