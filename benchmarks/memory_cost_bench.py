"""What a memory task costs as its bank grows, against a flow task's graph, measured in one run.

Exports the default config's flow graph (one task's fused flow; its cost does not depend on the
weights) and memory graphs with banks of each size, then times every graph interleaved with
onnxruntime fp32 on the CPU at batch 1, one intra-op thread, and writes each bank to a task file to
weigh it. Two clocks: wall time (measure_calls) and the calling thread's CPU time
(time.thread_time; with one intra-op thread onnxruntime runs every kernel on it), which a busy
shared machine's waits for a core do not inflate. A memory
task keeps every patch of its training images (up to coreset_max) and variant_cover patches of
their photometric variants, so its bank, and this cost, grow with its training images.

    python benchmarks/memory_cost_bench.py [--sizes 1000,2000,3000,4000,6000] [--threads 1] [--iters 200]

With ``--data ROOT`` it times banks of real patch vectors instead (--banks, default 3k to 300k):
candidates are every training patch of every product under ROOT, of its photometric variants and
of their mirror images (a larger simulated product), a bank every patch of a seeded random choice
of those images (as the default keeps every patch of a product's images); each bank is searched as the
memory detector deploys it (exact below memory_lists_from, else inverted lists, a listed bank in
float16), timed at batch 1 and 8 against the 3000-vector exact graph, and its search compared with
the exact one over the same bank on test patches of ROOT.

    python benchmarks/memory_cost_bench.py --data ../shared/data/real-dev [--banks 10000,...] [--probe 8] [--list-size 128]
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch
from safetensors.torch import save_file

from moleflow_edge.augment import photometric_variants
from moleflow_edge.backbones import build_backbone
from moleflow_edge.bench.measure import measure_calls
from moleflow_edge.config import DetectorKind, MoleFlowConfig
from moleflow_edge.data.mvtec import list_categories, load_split
from moleflow_edge.detectors.memory.bank import MemoryBank, MemoryScorer
from moleflow_edge.detectors.memory.inverted_lists import inverted_lists
from moleflow_edge.detectors.memory.kind import patch_vectors
from moleflow_edge.detectors.registry import build_model, kind_of
from moleflow_edge.export import onnx_graphs
from moleflow_edge.features import extract_features
from moleflow_edge.model.continual_model import ContinualModel

QUERY_IMAGES = 4  # test images per product whose patches measure the search's fidelity


def graph_session(proto: object, threads: int) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return ort.InferenceSession(proto.SerializeToString(), options, providers=["CPUExecutionProvider"])  # type: ignore[attr-defined]


def thread_ms(calls: dict[str, Callable[[], object]], iters: int, rounds: int = 4) -> dict[str, float]:
    """Median CPU milliseconds of the calling thread per call, each call made ``iters`` times in
    ``rounds`` interleaved blocks (one untimed warm-up call per block)."""
    spent: dict[str, list[float]] = {name: [] for name in calls}
    for _ in range(rounds):
        for name, call in calls.items():
            call()
            for _ in range(iters // rounds):
                started = time.thread_time()
                call()
                spent[name].append((time.thread_time() - started) * 1e3)
    return {name: float(np.median(values)) for name, values in spent.items()}


def images_for(kept: int, config: MoleFlowConfig) -> str:
    """How many training images give a bank of ``kept`` vectors at the defaults: each image brings its
    own patches, and the bank adds variant_cover patches of the variants."""
    own = kept - config.section("memory").variant_cover
    return f"{own / config.grid_size**2:.0f}" if own > 0 else "-"


def real_vectors(model: ContinualModel, root: Path) -> tuple[torch.Tensor, torch.Tensor]:
    """(candidate patch vectors of ROOT's training images, variants and mirrors; test embeddings)."""
    config, candidates, queries = model.config, [], []
    for category in list_categories(root):
        images = load_split(root, category, "train", config.image_size).images
        variants = photometric_variants(images, config.augment_copies, config.augment_strength, config.seed)
        every = np.concatenate([images[None], variants]).reshape(-1, *images.shape[1:])
        candidates += [every, every[:, :, ::-1]]  # and their mirror images
        tests = load_split(root, category, "test", config.image_size).images[:QUERY_IMAGES]
        queries.append(model.embed(extract_features(model, tests).concat))
    images = np.concatenate(candidates)
    chunks = [np.ascontiguousarray(images[i : i + 64]) for i in range(0, len(images), 64)]
    return torch.cat([patch_vectors(model, extract_features(model, c).concat) for c in chunks]), torch.cat(queries)


def bank_table(
    model: ContinualModel, root: Path, sizes: list[int], iters: int, threads: int
) -> list[dict[str, object]]:
    """Each bank's ms per image at batch 1 and 8, task file size and fidelity, beside exact 3000."""
    config, dim, grid = model.config, model.config.embed_dim, model.config.grid_size
    with torch.no_grad():
        candidates, queries = real_vectors(model, root)
    print(f"{len(candidates)} candidate patch vectors, {len(queries)} query images; load {os.getloadavg()}")
    per_image = grid * grid  # candidates come image by image: a bank takes whole images
    chosen = torch.randperm(len(candidates) // per_image, generator=torch.Generator().manual_seed(config.seed))
    order = (chosen[:, None] * per_image + torch.arange(per_image)).flatten()
    position = model.embedder.position.detach()
    graphs, rows = {}, []
    with tempfile.TemporaryDirectory() as tmp:
        for kept in [3000, *sizes]:
            bank = MemoryBank(dim)
            bank.bank = candidates[order[:kept]]
            started = time.perf_counter()
            lists = kept >= config.section("memory").memory_lists_from
            if lists:
                list_size = config.section("memory").memory_list_size
                bank.bank = bank.bank.half()  # as the memory detector keeps a listed bank
                bank.centroids, bank.lists = inverted_lists(bank.bank.float(), list_size, config.seed)
            fit_s = time.perf_counter() - started
            name = f"{'lists' if lists else 'exact'} {kept}"
            model.per_task[name] = bank
            scorer = kind_of(DetectorKind.MEMORY).scorer(model, name)
            del model.per_task[name]
            with torch.no_grad():
                got = torch.cat([scorer(q[None])[0] for q in queries]).flatten()
                exact = torch.cat([MemoryScorer(bank.bank, position)(q[None])[0] for q in queries]).flatten()
            graphs[name] = onnx_graphs.scorer_graph(scorer, dim, grid)
            save_file({k: v.contiguous() for k, v in bank.state_dict().items()}, f"{tmp}/t.safetensors")
            rows.append({
                "bank": name, "lists": len(bank.centroids), "list_length": bank.lists.shape[1] if lists else 0,
                "build_s": round(fit_s, 1), "task_file_mib": round(Path(f"{tmp}/t.safetensors").stat().st_size / 2**20, 1),
                "exact_share": round(float(torch.isclose(got, exact, rtol=1e-5).float().mean()), 4),
                "worst_rel_err": float((got / exact.clamp_min(1e-12) - 1).max()),
                "within_1pct": round(float((got <= exact * 1.01).float().mean()), 4),
            })  # fmt: skip
    rng = np.random.default_rng(0)
    inputs = {b: rng.normal(size=(b, dim, grid, grid)).astype(np.float32) for b in (1, 8)}
    sessions = {name: graph_session(proto, threads) for name, proto in graphs.items()}
    for b, embedding in inputs.items():
        calls = {n: (lambda s=s, e=embedding: s.run(None, {"embedding": e})) for n, s in sessions.items()}
        cpu = thread_ms(calls, iters)
        for row in rows:
            row[f"ms_per_image_b{b}"] = round(cpu[row["bank"]] / b, 3)
    base = rows[0]["ms_per_image_b1"]
    print(f"onnxruntime {ort.__version__} CPU fp32, {threads} thread(s), thread CPU ms; load {os.getloadavg()}")
    for row in rows:
        row["b1_vs_exact_3000"] = round(row["ms_per_image_b1"] / base, 2)
        print("  ".join(f"{k}={v}" for k, v in row.items()))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="1000,2000,3000,4000,6000", help="bank sizes (kept vectors) to time")
    parser.add_argument("--threads", type=int, default=1, help="onnxruntime intra-op threads")
    parser.add_argument("--iters", type=int, default=200, help="timed calls per graph")
    parser.add_argument("--json", type=Path, help="write the rows here too")
    parser.add_argument("--data", type=Path, help="time banks of this root's real patch vectors instead")
    parser.add_argument("--banks", default="10000,30000,100000,300000", help="with --data: bank sizes beside 3000")
    parser.add_argument("--list-size", type=int, help="with --data: memory_list_size (default: the config's)")
    parser.add_argument("--probe", type=int, help="with --data: memory_probe (default: the config's)")
    args = parser.parse_args()
    config = MoleFlowConfig()
    lists = {"memory_list_size": args.list_size, "memory_probe": args.probe}
    config = config.with_settings("memory", **{k: v for k, v in lists.items() if v is not None})
    torch.manual_seed(0)
    backbone = build_backbone(config)
    config = config.with_overrides(embed_dim=min(config.embed_dim, backbone.channels8 + backbone.channels16))
    model = build_model(config, backbone).eval()
    dim, grid = config.embed_dim, config.grid_size
    if args.data:
        rows = bank_table(model, args.data, [int(s) for s in args.banks.split(",")], args.iters, args.threads)
        if args.json:
            args.json.write_text(json.dumps(rows, indent=2) + "\n")
        return
    model.add_task("flow", kind_of(DetectorKind.FLOW))
    graphs = {"flow": onnx_graphs.scorer_graph(kind_of(DetectorKind.FLOW).scorer(model, "flow"), dim, grid)}
    sizes = [int(s) for s in args.sizes.split(",")]
    task_bytes = {}
    with tempfile.TemporaryDirectory() as tmp:
        flow_state = {k: v.contiguous() for k, v in model.task_state_dict("flow").items()}
        save_file(flow_state, f"{tmp}/flow.safetensors")
        task_bytes["flow"] = Path(f"{tmp}/flow.safetensors").stat().st_size
        for kept in sizes:
            name = f"memory {kept}"
            model.add_task(f"m{kept}", kind_of(DetectorKind.MEMORY))
            bank = model.per_task[f"m{kept}"]
            assert isinstance(bank, MemoryBank)
            bank.bank = torch.randn(kept, dim)
            scorer = kind_of(DetectorKind.MEMORY).scorer(model, f"m{kept}")
            graphs[name] = onnx_graphs.scorer_graph(scorer, dim, grid)
            save_file({"bank": bank.bank.contiguous()}, f"{tmp}/{kept}.safetensors")
            task_bytes[name] = Path(f"{tmp}/{kept}.safetensors").stat().st_size
    embedding = np.random.default_rng(0).normal(size=(1, dim, grid, grid)).astype(np.float32)
    sessions = {name: graph_session(proto, args.threads) for name, proto in graphs.items()}
    calls = {name: (lambda s=s: s.run(None, {"embedding": embedding})) for name, s in sessions.items()}
    timed = measure_calls(calls, args.iters)
    cpu = thread_ms(calls, args.iters)
    flow_ms, flow_cpu = timed["flow"]["p50"], cpu["flow"]
    rows = []
    print(f"onnxruntime {ort.__version__} CPU fp32, batch 1, {args.threads} thread(s), {args.iters} calls each, "
          f"D={dim}, {grid}x{grid} patches; images: whose patches and {config.section('memory').variant_cover} "
          f"variant patches make the bank")  # fmt: skip
    print(f"{'graph':<14}{'wall p50 ms':>12}{'x flow':>8}{'CPU ms':>9}{'x flow':>8}{'task MiB':>10}{'images':>9}")
    for name in graphs:
        kept = int(name.split()[1]) if name != "flow" else 0
        row = {
            "graph": name,
            "wall_p50_ms": timed[name]["p50"],
            "wall_vs_flow": round(timed[name]["p50"] / flow_ms, 2),
            "cpu_ms": round(cpu[name], 3),
            "cpu_vs_flow": round(cpu[name] / flow_cpu, 2),
            "task_file_mib": round(task_bytes[name] / 2**20, 2),
            "images": images_for(kept, config) if kept else "-",
        }
        rows.append(row)
        print(f"{name:<14}{row['wall_p50_ms']:>12.3f}{row['wall_vs_flow']:>8.2f}{row['cpu_ms']:>9.3f}"
              f"{row['cpu_vs_flow']:>8.2f}{row['task_file_mib']:>10.2f}{row['images']:>9}")  # fmt: skip
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2) + "\n")


if __name__ == "__main__":
    main()
