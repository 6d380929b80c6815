"""How many serve replicas a plant needs: many cameras against replicas, simulated from measured service times.

A discrete-event simulation. Each camera sends one frame every 1/fps seconds (random phase, 5 % jitter)
to the replica its connection is pinned to (camera i -> replica i mod R: HTTP keep-alive and gRPC
channels stick to one pod behind a Kubernetes Service). Each replica is one model instance with
Triton's dynamic batcher: when idle it takes up to max_batch queued frames, waiting up to the queue
delay for more if fewer are queued, and is busy for the measured time of that batch size. Service
times come from serve_bench's JSON (in-process batch 1 and batch max_batch, per-frame cost
interpolated between them) plus the measured serving overhead per request (serve at 1 client minus
in-process batch 1). The reply: per (cameras, fps) the fewest replicas whose p99 latency meets the
budget, with that p99 and the replicas' utilisation.

    python benchmarks/serve_capacity.py --bench serve_bench.json [--budget-ms 100] [--cameras 8,32,128] [--fps 2,5,10]
"""

from __future__ import annotations

import argparse
import heapq
import json
import random
from dataclasses import dataclass
from pathlib import Path

import numpy as np

SECONDS = 30.0  # simulated time per setting
MAX_REPLICAS = 256


@dataclass(frozen=True)
class ServiceModel:
    """Seconds a replica is busy with a batch of ``b`` frames: fixed + per-frame cost, from measurements."""

    batch1_s: float
    batchn_s: float
    max_batch: int
    overhead_s: float
    delay_s: float

    def busy(self, b: int) -> float:
        per_frame = (self.batchn_s - self.batch1_s) / max(1, self.max_batch - 1)
        return self.batch1_s + per_frame * (b - 1) + self.overhead_s


def simulate(cameras: int, fps: float, replicas: int, model: ServiceModel, seed: int = 0) -> tuple[float, float]:
    """(p99 latency in s, mean replica utilisation) over SECONDS of simulated time."""
    rng = random.Random(seed)
    events: list[tuple[float, int, str, int]] = []  # (time, order, kind, camera or replica)
    order = 0
    for camera in range(cameras):
        heapq.heappush(events, (rng.uniform(0, 1 / fps), order, "frame", camera))
        order += 1
    queues: list[list[float]] = [[] for _ in range(replicas)]
    busy_until = [0.0] * replicas
    busy_total = [0.0] * replicas
    waiting = [False] * replicas
    latencies: list[float] = []

    def start(replica: int, now: float) -> None:
        nonlocal order
        batch, queues[replica] = queues[replica][: model.max_batch], queues[replica][model.max_batch :]
        done = now + model.busy(len(batch))
        busy_until[replica], busy_total[replica] = done, busy_total[replica] + done - now
        latencies.extend(done - arrived for arrived in batch)
        heapq.heappush(events, (done, order, "idle", replica))
        order += 1

    while events:
        now, _, kind, who = heapq.heappop(events)
        if now > SECONDS:
            break
        if kind == "frame":
            replica = who % replicas
            queues[replica].append(now)
            heapq.heappush(events, (now + rng.gauss(1 / fps, 0.05 / fps), order, "frame", who))
            order += 1
            if busy_until[replica] <= now:
                if len(queues[replica]) >= model.max_batch or model.delay_s == 0:
                    waiting[replica] = False
                    start(replica, now)
                elif not waiting[replica]:  # the batcher waits up to the queue delay for company
                    waiting[replica] = True
                    heapq.heappush(events, (now + model.delay_s, order, "delay", replica))
                    order += 1
        elif kind == "delay" or (kind == "idle" and queues[who] and not waiting[who]):
            waiting[who] = False
            if queues[who] and busy_until[who] <= now:
                start(who, now)
    if not latencies:
        return float("inf"), 0.0
    return float(np.percentile(latencies, 99)), sum(busy_total) / (replicas * SECONDS)


def service_model(bench: dict, delay_us: int) -> ServiceModel:
    rows = bench["rows"]
    in_process = {r["mode"]: r for r in rows if r["mode"].startswith("in-process")}
    batches = sorted(int(mode.rsplit(" ", 1)[1]) for mode in in_process)
    b1, bn = in_process[f"in-process, batch {batches[0]}"], in_process[f"in-process, batch {batches[-1]}"]
    one = [r for r in rows if r["mode"] == "serve" and r["clients"] == 1 and r["encoding"] == "raw"]
    overhead = max(0.0, min(r["p50_ms"] for r in one) - b1["p50_ms"]) / 1e3 if one else 0.0
    return ServiceModel(b1["p50_ms"] / 1e3, bn["p50_ms"] / 1e3, batches[-1], overhead, delay_us / 1e6)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--bench", type=Path, required=True, help="serve_bench.py --json output")
    parser.add_argument("--budget-ms", type=float, default=100.0, help="p99 latency each frame must meet")
    parser.add_argument("--cameras", default="8,32,128")
    parser.add_argument("--fps", default="2,5,10")
    parser.add_argument("--delay-us", type=int, default=2000)
    args = parser.parse_args()
    model = service_model(json.loads(args.bench.read_text()), args.delay_us)
    print(f"service model: batch 1 {model.batch1_s * 1e3:.1f} ms, batch {model.max_batch} {model.batchn_s * 1e3:.1f} ms, "
          f"serving overhead {model.overhead_s * 1e3:.1f} ms per batch, queue delay {model.delay_s * 1e6:.0f} us")  # fmt: skip
    print(f"\n| cameras | fps each | frames/s | replicas for p99 <= {args.budget_ms:g} ms | p99 ms | utilisation |")
    print("|---:|---:|---:|---:|---:|---:|")
    for cameras in (int(c) for c in args.cameras.split(",")):
        for fps in (float(f) for f in args.fps.split(",")):
            replicas = max(1, int(np.ceil(cameras * fps * model.busy(model.max_batch) / model.max_batch)))
            while replicas <= min(cameras, MAX_REPLICAS):
                p99, utilisation = simulate(cameras, fps, replicas, model)
                if p99 * 1e3 <= args.budget_ms:
                    break
                replicas += 1
            else:
                print(f"| {cameras} | {fps:g} | {cameras * fps:g} | not met with one replica per camera | - | - |")
                continue
            print(f"| {cameras} | {fps:g} | {cameras * fps:g} | {replicas} | {p99 * 1e3:.1f} | {utilisation:.2f} |")


if __name__ == "__main__":
    main()
