"""Accuracy on real products: continual models of each detector kind against two references, same features.

Learns every product of an MVTec-layout root in sequence as ONE continual model per detector kind
(the default flow always; ``--detector memory`` adds a model of memory tasks), evaluates each
routed (as deployed: eval runs the runtime itself over the trained model), exports each fp32 and
times every task's graph (onnxruntime CPU, batch 1, one thread) and weighs its task file; and in
the same run scores the same products with two references that see identical backbone features
on the identical patch grid:
  knn       nearest neighbour over every training patch (PatchCore without coreset), image
            score = max patch distance;
  gaussian  one Ledoit-Wolf Gaussian over every training patch, Mahalanobis distance per patch.
Per product: image AUROC, pixel AUROC, pixel AP, AUPRO, routing accuracy, forgetting and the
exposure score (AUROC of test/good against the same images x0.9 and x1.1: 0.5 = unaffected,
above 0.5 = brighter or darker good parts look more anomalous). A second table does the same for
an MJPEG camera: per detector kind, the test/good images re-encoded as JPEG at quality 95, 90 and
75, how many the router stops as "unknown product" and their score shift against the same images
as decoded PNG. Products with fewer than SMOKE_IMAGES training images are reported but stay out
of the means (the unknown counts are totalled over every product).

    python benchmarks/accuracy_bench.py --data ../shared/data/real-dev [--detector memory] [--config cfg.json]
        [--out runs/acc]
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch

from moleflow_edge.augment import jpeg_round_trips
from moleflow_edge.bench.measure import measure_calls
from moleflow_edge.config import DetectorKind, MoleFlowConfig
from moleflow_edge.contract import load_manifest
from moleflow_edge.data.mvtec import list_categories, load_split
from moleflow_edge.evaluate import anomaly_maps, evaluate, split_metrics
from moleflow_edge.export.exporter import export_model
from moleflow_edge.features import extract_features
from moleflow_edge.metrics import auroc
from moleflow_edge.model_store import ModelStore
from moleflow_edge.router import UNKNOWN, ledoit_wolf, mahalanobis_whitener
from moleflow_edge.runtime.result import FrameResult
from moleflow_edge.runtime.runtime import Runtime
from moleflow_edge.torch_backend import runtime_of
from moleflow_edge.train import train_task

SMOKE_IMAGES = 10  # fewer training images than this: a smoke test, out of the means
GAINS = (0.9, 1.1)
JPEG_QUALITIES = (95, 90, 75)
METRICS = ("image_auroc", "pixel_auroc", "pixel_ap", "aupro")
QUERY_CHUNK = 4096
REFERENCES = ("knn", "gaussian")
TIMED_CALLS = 100  # per task graph, batch 1


def with_gain(images: np.ndarray, gain: float) -> np.ndarray:
    """Every pixel times ``gain``, rounded and clipped like a camera's exposure change."""
    return np.clip(np.rint(images.astype(np.float32) * gain), 0, 255).astype(np.uint8)


def patches(concat: torch.Tensor) -> torch.Tensor:
    """(N,C,H,W) -> (N*H*W, C) patch vectors."""
    return concat.permute(0, 2, 3, 1).reshape(-1, concat.shape[1])


def max_patch(patch: np.ndarray) -> np.ndarray:
    """The references' image score: (N,H,W) patch scores -> (N,) maximum."""
    return patch.reshape(len(patch), -1).max(axis=1)


class KnnReference:
    """Distance to the nearest training patch (full memory bank)."""

    def __init__(self, train_concat: torch.Tensor) -> None:
        self.bank = patches(train_concat).float()

    def patch_scores(self, concat: torch.Tensor) -> np.ndarray:
        queries = patches(concat).float()
        out = [torch.cdist(q, self.bank).min(dim=1).values for q in queries.split(QUERY_CHUNK)]
        return torch.cat(out).reshape(concat.shape[0], *concat.shape[2:]).numpy()


class GaussianReference:
    """Mahalanobis distance to one Ledoit-Wolf Gaussian of all training patches."""

    def __init__(self, train_concat: torch.Tensor) -> None:
        bank = patches(train_concat).double().numpy()
        self.mean = bank.mean(axis=0)
        self.whitener = torch.from_numpy(mahalanobis_whitener(ledoit_wolf(bank - self.mean)))

    def patch_scores(self, concat: torch.Tensor) -> np.ndarray:
        centred = patches(concat).double() - torch.from_numpy(self.mean)
        dist = (centred @ self.whitener.T).pow(2).sum(dim=1).sqrt()
        return dist.reshape(concat.shape[0], *concat.shape[2:]).float().numpy()


def score_shift(base: np.ndarray, changed: np.ndarray) -> float:
    """AUROC of the good images' changed scores against their unchanged ones (label 1 = changed)."""
    return auroc(np.r_[np.zeros(len(base)), np.ones(len(changed))], np.r_[base, changed])


def exposure(scores: dict[float, np.ndarray]) -> dict[str, float]:
    """Score shift of the good images at each gain against gain 1."""
    return {f"x{g}": score_shift(scores[1.0], scores[g]) for g in GAINS}


def image_scores(results: list[FrameResult]) -> np.ndarray:
    """(N,) image scores of the runtime's results; a frame stopped as no known product scores +inf."""
    return np.array([np.inf if r.image_score is None else r.image_score for r in results], dtype=np.float32)


def camera_jpeg(png: list[FrameResult], jpeg: dict[int, list[FrameResult]]) -> dict[str, float]:
    """Per JPEG quality: good images the router stops as unknown, and their score shift against PNG
    (a stopped frame scores +inf, so it counts as shifted)."""
    out: dict[str, float] = {"good": len(png)}
    for q, scored in jpeg.items():
        out[f"q{q}_unknown"] = sum(r.task == UNKNOWN for r in scored)
        out[f"q{q}"] = score_shift(image_scores(png), image_scores(scored))
    return out


class Deployed:
    """One continual model of one detector kind, and the runtime over it, as eval uses it."""

    def __init__(self, model_dir: Path) -> None:
        self.model_dir = model_dir
        store = ModelStore(model_dir)
        self.model, prototypes = store.load()
        self.runtime: Runtime = runtime_of(store, self.model, prototypes)


def product_results(deployed: dict[str, Deployed], root: Path, product: str) -> dict[str, dict[str, float]]:
    """Exposure and camera JPEG of each deployed kind, and both references' metrics and exposure, on one product.

    The backbone runs once per image set for the references (train, test, and the good test images at each
    gain) and once per deployed kind in its runtime; every model shares the backbone, so every detector and
    both references score the same features.
    """
    model = next(iter(deployed.values())).model
    cfg = model.config
    train = extract_features(model, load_split(root, product, "train", cfg.image_size).images).concat
    test = load_split(root, product, "test", cfg.image_size)
    test_concat = extract_features(model, test.images).concat
    good = test.images[~test.labels.astype(bool)]
    at_gain = {g: extract_features(model, with_gain(good, g)) for g in (1.0, *GAINS)}
    at_jpeg = dict(zip(JPEG_QUALITIES, jpeg_round_trips(good, JPEG_QUALITIES), strict=True))
    results = {}
    for kind, d in deployed.items():
        gains = {g: d.runtime.infer(with_gain(good, g), with_maps=False) for g in at_gain}
        jpeg = {q: d.runtime.infer(images, with_maps=False) for q, images in at_jpeg.items()}
        results[kind] = {**exposure({g: image_scores(s) for g, s in gains.items()}), **camera_jpeg(gains[1.0], jpeg)}
    for name, ref in zip(REFERENCES, (KnnReference(train), GaussianReference(train)), strict=True):
        patch = ref.patch_scores(test_concat)
        metrics = split_metrics(test, anomaly_maps(patch, cfg), max_patch(patch))
        gains = {g: max_patch(ref.patch_scores(f.concat)) for g, f in at_gain.items()}
        results[name] = {**dict(zip(METRICS, metrics, strict=True)), **exposure(gains)}
    return results


def deployment_costs(deployed: Deployed, export_dir: Path) -> dict[str, dict[str, float]]:
    """Per task: its exported fp32 graph's milliseconds per image (onnxruntime CPU, batch 1, one
    thread, every task interleaved) and its task file's size on disk."""
    import onnxruntime as ort

    export_model(deployed.model_dir, export_dir, precisions=("fp32",))
    manifest = load_manifest(export_dir)
    cfg = deployed.model.config
    embedding = np.random.default_rng(0).normal(size=(1, cfg.embed_dim, cfg.grid_size, cfg.grid_size))
    feed = {"embedding": embedding.astype(np.float32)}
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    sessions = {
        t.name: ort.InferenceSession(
            str(export_dir / t.graphs["fp32"].file), options, providers=["CPUExecutionProvider"]
        )
        for t in manifest.tasks
    }
    timed = measure_calls({task: (lambda s=s: s.run(None, feed)) for task, s in sessions.items()}, TIMED_CALLS)
    store = ModelStore(deployed.model_dir)
    return {
        task: {"graph_ms": timed[task]["p50"], "task_file_mib": store.task_file(task).stat().st_size / 2**20}
        for task in sessions
    }


def means(rows: dict[str, dict[str, float]], products: list[str]) -> dict[str, float]:
    keys = rows[products[0]].keys()
    return {k: float(np.mean([rows[p][k] for p in products])) for k in keys}


def run(
    root: Path, out: Path, config: MoleFlowConfig, products: list[str], kinds: list[DetectorKind], device: str = "cpu"
) -> dict:
    deployed: dict[str, Deployed] = {}
    evaluated: dict[str, dict] = {}
    train_info: dict[str, dict[str, dict]] = {}
    for kind in kinds:
        model_dir = out / f"model-{kind.value}"
        if ModelStore(model_dir).tasks():
            raise SystemExit(f"{model_dir} already holds a model: pass a fresh --out")
        train_info[kind.value] = {}
        for i, product in enumerate(products):
            print(f"[{kind.value} {i + 1}/{len(products)}] learning {product}", flush=True)
            report = train_task(root, product, model_dir, config, device=device, detector=kind)
            train_info[kind.value][product] = {
                "images": report.images, "steps": report.metrics.get("steps", 0), "train_seconds": report.train_seconds,
                "fit": report.summary,
            }  # fmt: skip
        print(f"evaluating {kind.value} (routed)", flush=True)
        evaluated[kind.value] = evaluate(root, model_dir)
        deployed[kind.value] = Deployed(model_dir)
    costs = {kind: deployment_costs(d, out / f"export-{kind}") for kind, d in deployed.items()}
    rows: dict[str, dict] = {}
    for product in products:
        print(f"references and exposure: {product}", flush=True)
        row = product_results(deployed, root, product)
        for kind in deployed:
            row[kind] = {**evaluated[kind]["tasks"][product], **row[kind], **costs[kind][product]}
        rows[product] = {**row, "train": {k: info[product] for k, info in train_info.items()}}
    first = next(iter(train_info.values()))
    counted = [p for p in products if first[p]["images"] >= SMOKE_IMAGES]
    summary = {}
    for name in [*deployed, *REFERENCES]:
        gains = [rows[p][name][f"x{g}"] for p in counted for g in GAINS]
        summary[name] = {
            **means({p: rows[p][name] for p in counted}, counted),
            "exposure_mean": float(np.mean(gains)),
            "exposure_max": float(np.max(gains)),
        }
    for kind in deployed:
        for key in ("good", *(f"q{q}_unknown" for q in JPEG_QUALITIES)):  # every product, smoke ones too
            summary[kind][key] = int(sum(rows[p][kind][key] for p in products))
        summary[kind]["jpeg_max"] = float(np.max([rows[p][kind][f"q{q}"] for p in counted for q in JPEG_QUALITIES]))
    return {
        "data": str(root),
        "config": asdict(next(iter(deployed.values())).model.config),
        "detectors": list(deployed),
        "products": rows,
        "mean_over": counted,
        "mean": summary,
        "forgetting": {kind: e["forgetting"] for kind, e in evaluated.items()},
    }


def markdown(result: dict) -> str:
    cols = [*METRICS, "x0.9", "x1.1"]
    kinds = result["detectors"]
    lines = [
        "| product | detector | " + " | ".join(cols) + " | routing | graph ms | task MiB |",
        "|---|---|" + "---:|" * (len(cols) + 3),
    ]
    for product, row in result["products"].items():
        for name in [*kinds, *REFERENCES]:
            cells = " | ".join(f"{row[name][c]:.3f}" for c in cols)
            deployed = (
                f"{row[name]['routing_accuracy']:.3f} | {row[name]['graph_ms']:.2f} | {row[name]['task_file_mib']:.2f}"
                if name in kinds
                else "- | - | -"
            )
            lines.append(f"| {product} | {name} | {cells} | {deployed} |")
    for name, m in result["mean"].items():
        cells = " | ".join(f"{m[c]:.3f}" for c in METRICS)
        deployed = (
            f"{m['routing_accuracy']:.3f} | {m['graph_ms']:.2f} | {m['task_file_mib']:.2f}"
            if name in kinds
            else "- | - | -"
        )
        lines.append(
            f"| **mean** | {name} | {cells} | mean {m['exposure_mean']:.3f} | max {m['exposure_max']:.3f} | {deployed} |"
        )
    forgetting = "; ".join(
        f"{kind}: " + ", ".join(f"{k} {v:.3f}" for k, v in values.items())
        for kind, values in result["forgetting"].items()
    )
    return (
        "\n".join(lines) + f"\n\nmeans over {', '.join(result['mean_over'])}; forgetting: {forgetting}\n\n"
        + jpeg_markdown(result) + "\n"
    )  # fmt: skip


def jpeg_markdown(result: dict) -> str:
    """The camera JPEG table: good images stopped as unknown (of the good ones) and score shift per quality."""
    unknown = [f"unknown q{q}" for q in JPEG_QUALITIES]
    shift = [f"shift q{q}" for q in JPEG_QUALITIES]
    lines = [
        "| product | detector | " + " | ".join(unknown + shift) + " | exposure shift max |",
        "|---|---|" + "---:|" * (len(unknown) + len(shift) + 1),
    ]
    for product, row in result["products"].items():
        for kind in result["detectors"]:
            r = row[kind]
            counts = [f"{r[f'q{q}_unknown']} of {r['good']}" for q in JPEG_QUALITIES]
            shifts = [f"{r[f'q{q}']:.3f}" for q in JPEG_QUALITIES]
            lines.append(
                f"| {product} | {kind} | " + " | ".join(counts + shifts) + f" | {max(r['x0.9'], r['x1.1']):.3f} |"
            )
    for kind in result["detectors"]:
        m = result["mean"][kind]
        counts = [f"{m[f'q{q}_unknown']} of {m['good']}" for q in JPEG_QUALITIES]
        shifts = [f"{m[f'q{q}']:.3f}" for q in JPEG_QUALITIES]
        lines.append(f"| **all** | {kind} | " + " | ".join(counts + shifts) + f" | {m['exposure_max']:.3f} |")
    return (
        "\n".join(lines)
        + f"\n\nshift: mean over {', '.join(result['mean_over'])}; JPEG shift max "
        + ", ".join(f"{kind} {result['mean'][kind]['jpeg_max']:.3f}" for kind in result["detectors"])
    )


def write_results(out: Path, name: str, result: dict, table: str) -> None:
    """OUT/<name>.json and OUT/<name>.md, and the table on stdout."""
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{name}.json").write_text(json.dumps(result, indent=2) + "\n")
    (out / f"{name}.md").write_text(table)
    print(table)
    print(f"wrote {out / name}.json and {name}.md ({result['seconds']:.0f} s)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, required=True, help="MVTec-layout root: every category is learned")
    parser.add_argument("--config", type=Path, help="MoleFlowConfig JSON (default: the default config)")
    parser.add_argument("--detector", type=DetectorKind, choices=list(DetectorKind), action="append", default=[],
                        help="also learn every product with this detector kind, as its own model (repeatable); "
                        "the default flow is always measured")  # fmt: skip
    parser.add_argument("--products", help="comma-separated subset, in learning order (default: all, sorted)")
    parser.add_argument("--out", type=Path, default=Path("runs/accuracy"), help="fresh folder for models and results")
    parser.add_argument("--device", default="cpu", help="training device: cpu, cuda or cuda:N")
    args = parser.parse_args()
    config = MoleFlowConfig.from_json(args.config) if args.config else MoleFlowConfig()
    products = args.products.split(",") if args.products else list_categories(args.data)
    kinds = list(dict.fromkeys([DetectorKind.FLOW, *args.detector]))
    started = time.perf_counter()
    result = run(args.data, args.out, config, products, kinds, args.device)
    result["seconds"] = time.perf_counter() - started
    write_results(args.out, "accuracy", result, markdown(result))


if __name__ == "__main__":
    main()
