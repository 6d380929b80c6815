"""The router under MJPEG cameras, with and without JPEG round trips in its prototypes: no flow needed.

Routing needs only the backbone, so this measures in minutes what the accuracy bench measures
with trained models. Every product's prototype is fitted twice from the same features, as train
fits it (train.camera_variants): on the originals alone (the reference, the router before JPEG
round trips) and with the round trips. Two tables:
  known     every product learned: test/good frames stopped as "unknown product" as PNG and
            re-encoded as JPEG at quality 95, 90 and 75 (the target: none), and defective test
            frames stopped (PNG; the line stops them too, a damaged part's pooled feature moves);
  left out  prototypes of every product but one: how many of the left-out product's test frames
            (good and defective, PNG; and its good frames at JPEG 75) the router stops as unknown
            (the target: all), and the closest one's distance in units of its nearest task's limit.

    python benchmarks/router_jpeg_bench.py --data ../shared/data/real-dev [--config cfg.json] [--out runs/router-jpeg]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from accuracy_bench import JPEG_QUALITIES, write_results

from moleflow_edge.augment import jpeg_round_trips
from moleflow_edge.config import MoleFlowConfig
from moleflow_edge.data.mvtec import list_categories, load_split
from moleflow_edge.features import extract_features
from moleflow_edge.model_store import ModelStore
from moleflow_edge.router import UNKNOWN, Prototype, RouterTable, fit_prototype
from moleflow_edge.train import camera_variants, prepare_model

FITS = ("png only", "with jpeg")  # the reference (prototypes before this change), then as train fits them


def product_features(model: torch.nn.Module, root: Path, product: str) -> dict[str, np.ndarray]:
    """Routing features: train (1+Q,N,C) as train computes them, test (M,C), test labels, and the
    good test frames as PNG and at each JPEG quality."""
    size = model.config.image_size
    train = load_split(root, product, "train", size).images
    test = load_split(root, product, "test", size)
    good = test.images[test.labels == 0]
    out = {"train": np.stack([f.routing for f in camera_variants(model, train)]), "labels": test.labels}
    out["test"] = extract_features(model, test.images).routing
    out["png"] = out["test"][test.labels == 0]
    out["defective"] = out["test"][test.labels == 1]
    for q, jpeg in zip(JPEG_QUALITIES, jpeg_round_trips(good, JPEG_QUALITIES), strict=True):
        out[f"q{q}"] = extract_features(model, jpeg).routing
    return out


def prototype(train: np.ndarray, config: MoleFlowConfig, fit: str) -> Prototype:
    variants = train[1:] if fit == FITS[1] else None
    return fit_prototype(
        train[0], config.router_covariance, config.router_ridge, config.router_limit_quantile,
        config.router_limit_margin, variants=variants,
    )  # fmt: skip


def stopped(table: RouterTable, routing: np.ndarray) -> int:
    return sum(t == UNKNOWN for t in table.assign(table.distances(routing)))


def closest(table: RouterTable, routing: np.ndarray) -> float:
    """The smallest distance of any frame to its nearest task, in units of that task's limit."""
    distances = table.distances(routing)
    nearest = np.argmin(distances, axis=1)
    return float(np.min(distances[np.arange(len(distances)), nearest] / table.limits[nearest]))


def run(root: Path, config: MoleFlowConfig, products: list[str]) -> dict:
    with tempfile.TemporaryDirectory() as empty:
        model = prepare_model(ModelStore(empty), config).eval()
    feats = {}
    for product in products:
        print(f"routing features: {product}", flush=True)
        feats[product] = product_features(model, root, product)
    known, left_out = {}, {}
    for fit in FITS:
        protos = {p: prototype(feats[p]["train"], config, fit) for p in products}
        table = RouterTable(products, [protos[p] for p in products])
        known[fit] = {
            p: {"good": len(feats[p]["png"]), "defective": len(feats[p]["defective"]),
                **{v: stopped(table, feats[p][v]) for v in ("png", *[f"q{q}" for q in JPEG_QUALITIES])},
                "defective_unknown": stopped(table, feats[p]["defective"])}
            for p in products
        }  # fmt: skip
        left_out[fit] = {}
        for out in products:
            rest = [p for p in products if p != out]
            table = RouterTable(rest, [protos[p] for p in rest])
            left_out[fit][out] = {
                "frames": len(feats[out]["test"]), "unknown": stopped(table, feats[out]["test"]),
                "good": len(feats[out]["png"]), "q75_unknown": stopped(table, feats[out]["q75"]),
                "closest": closest(table, feats[out]["test"]),
            }  # fmt: skip
    return {"data": str(root), "products": products, "known": known, "left_out": left_out}


def markdown(result: dict) -> str:
    variants = ("png", *[f"q{q}" for q in JPEG_QUALITIES])
    lines = ["| router fit | product | good | " + " | ".join(f"unknown {v}" for v in variants) + " | defective stopped |",
             "|---|---|" + "---:|" * (len(variants) + 2)]  # fmt: skip
    for fit, rows in result["known"].items():
        total = {k: sum(r[k] for r in rows.values()) for k in next(iter(rows.values()))}
        for product, r in [*rows.items(), ("**all**", total)]:
            cells = " | ".join(str(r[v]) for v in variants)
            lines.append(
                f"| {fit} | {product} | {r['good']} | {cells} | {r['defective_unknown']} of {r['defective']} |"
            )
    lines += ["", "| router fit | left out | test frames stopped (PNG) | good stopped at JPEG 75 | closest / limit |",
              "|---|---|---:|---:|---:|"]  # fmt: skip
    for fit, rows in result["left_out"].items():
        for product, r in rows.items():
            lines.append(
                f"| {fit} | {product} | {r['unknown']} of {r['frames']} | {r['q75_unknown']} of {r['good']} | {r['closest']:.2f} |"
            )
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, required=True, help="MVTec-layout root: every category is a product")
    parser.add_argument("--config", type=Path, help="MoleFlowConfig JSON (default: the default config)")
    parser.add_argument("--out", type=Path, default=Path("runs/router-jpeg"), help="folder for the results")
    args = parser.parse_args()
    config = MoleFlowConfig.from_json(args.config) if args.config else MoleFlowConfig()
    torch.manual_seed(config.seed)
    started = time.perf_counter()
    result = run(args.data, config, list_categories(args.data))
    result["seconds"] = time.perf_counter() - started
    write_results(args.out, "router_jpeg", result, markdown(result))


if __name__ == "__main__":
    main()
