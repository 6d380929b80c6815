"""The moleflow-edge command line: synth, train, eval, export, learn, calibrate, run, serve, bench, demo.

Heavy imports (torch, onnx) happen inside the commands that need them, so ``run`` starts
fast on a line PC that has only the runtime installed.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Optional

import typer

from moleflow_edge.calibrate_command import calibrate
from moleflow_edge.cli_support import (
    DEVICE_OPTION_HELP,
    THREADS_OPTION_HELP,
    chosen_device,
    fail,
    few_images_note,
    given,
    positive_ints,
    set_torch_threads,
    torch_threads,
    writable,
    write_json,
)
from moleflow_edge.config import BackboneName, DetectorKind, MoleFlowConfig
from moleflow_edge.demo import FULL, QUICK
from moleflow_edge.errors import InputError, UserError
from moleflow_edge.learn_command import learn
from moleflow_edge.migrations.model_dir import nest_flat_fields
from moleflow_edge.run_command import run
from moleflow_edge.serving.command import serve
from moleflow_edge.targets import ONNXRUNTIME_HINT, TARGET_NAMES, ExportFormat

app = typer.Typer(
    help="Train, export and run MoLE-Flow continual anomaly detection on the factory floor.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)


@app.command()
def synth(
    out: Path = typer.Option(..., help="Dataset root to write (MVTec AD layout)."),
    categories: Optional[str] = typer.Option(None, help="Comma-separated categories (default: all)."),
    seed: Optional[int] = typer.Option(None, help="Random seed: the same seed writes the same bytes."),
    image_size: Optional[int] = typer.Option(None, help="Side of the square images in pixels."),
    n_train: Optional[int] = typer.Option(None, help="Normal training images per category."),
    n_test_good: Optional[int] = typer.Option(None, help="Normal test images per category."),
    n_test_defect: Optional[int] = typer.Option(None, help="Test images per defect kind per category."),
) -> None:
    """Write a synthetic dataset with exact defect masks, for tests and the demo (an option left out takes
    data/synth.py generate's default)."""
    from moleflow_edge.data.synth import generate

    writable(out, "--out", directory=True)
    try:
        sizes = given(seed=seed, image_size=image_size, n_train=n_train, n_test_good=n_test_good,
                      n_test_defect=n_test_defect)  # fmt: skip
        written = generate(out, categories.split(",") if categories else None, **sizes)
    except (UserError, OSError) as exc:
        fail(str(exc))
    typer.echo(f"wrote {', '.join(written)} to {out}")


def _config(
    config_file: Optional[Path], backbone: Optional[BackboneName], image_size: Optional[int]
) -> MoleFlowConfig | None:
    """The config the options give (None: the default, or the model's own); a bad file or field is an InputError."""
    if config_file is None and backbone is None and image_size is None:
        return None
    try:
        base = MoleFlowConfig.from_json(config_file, upgrade=nest_flat_fields) if config_file else MoleFlowConfig()
        return base.with_overrides(backbone=backbone, image_size=image_size)
    except OSError as exc:
        raise InputError(f"--config {config_file}: {exc.strerror or exc}") from None
    except ValueError as exc:  # MoleFlowConfig's checks of the user's fields (it names the file and the field)
        raise InputError(str(exc)) from None


@app.command()
def train(
    data: Path = typer.Option(..., help="Dataset root in MVTec AD layout."),
    task: str = typer.Option(..., help="Category to learn as the next task (folder name under --data)."),
    model: Path = typer.Option(..., help="Model directory; created on the first task, extended afterwards."),
    config: Optional[Path] = typer.Option(None, help="Config JSON (first task only; later tasks reuse the model's)."),
    backbone: Optional[BackboneName] = typer.Option(None, help="Backbone (first task only)."),
    image_size: Optional[int] = typer.Option(None, help="Input size, a multiple of 16 (first task only)."),
    steps: Optional[int] = typer.Option(
        None,
        min=1,
        help="Most optimiser steps for this task, where its kind takes steps (default: the config's flow.max_steps).",
    ),
    detector: Optional[DetectorKind] = typer.Option(
        None,
        help="This task's detector: flow (MoLE-Flow) or memory (a coreset of its training patches); "
        "default: the config's detector (flow).",
    ),
    device: str = typer.Option("auto", help=DEVICE_OPTION_HELP),
    threads: Optional[int] = typer.Option(None, min=1, help=THREADS_OPTION_HELP),
    amp: bool = typer.Option(
        False,
        help="On CUDA, float16 autocast for the backbone and flow subnets, loss in float32 (measured slower "
        "than float32 on an H100 at the papers' sizes: benchmarks/README.md, GPU check).",
    ),
) -> None:
    """Learn one product as a new task without touching earlier tasks."""
    from moleflow_edge.train import train_task

    where = chosen_device(
        device, lambda kind: "training, " + ("float16 mixed precision" if amp and kind == "cuda" else "float32")
    )
    set_torch_threads(threads)
    try:
        report = train_task(
            data, task, model, _config(config, backbone, image_size), steps, device=where, amp=amp, detector=detector
        )
    except UserError as exc:
        fail(str(exc))
    typer.echo(
        f"trained {report.task} ({report.detector.value}): {report.images} images ({report.holdout_images} held out "
        f"for its normal scale), {report.summary}, {report.train_seconds:.1f} s, features {report.feature_seconds:.1f} s"
    )
    if note := few_images_note(report.task, report.images):
        typer.echo(note)


@app.command("eval")
def eval_command(
    data: Path = typer.Option(..., help="Dataset root in MVTec AD layout."),
    model: Path = typer.Option(..., help="Trained model directory."),
    tasks: Optional[str] = typer.Option(None, help="Comma-separated tasks to evaluate (default: all)."),
    oracle: bool = typer.Option(False, help="Give each image its true task instead of routing it."),
    json_out: Optional[Path] = typer.Option(None, "--json", help="Write the results as JSON to this file."),
    device: str = typer.Option("auto", help=DEVICE_OPTION_HELP),
    threads: Optional[int] = typer.Option(None, min=1, help=THREADS_OPTION_HELP),
) -> None:
    """Image AUROC, pixel AUROC, pixel AP, routing accuracy and forgetting, task by task."""
    from moleflow_edge.evaluate import evaluate, format_eval_table

    writable(json_out, "--json")
    where = chosen_device(device, lambda _: "evaluation, float32")
    set_torch_threads(threads)
    try:
        results = evaluate(data, model, tasks.split(",") if tasks else None, oracle, device=where)
    except UserError as exc:
        fail(str(exc))
    typer.echo(format_eval_table(results))
    for name, metrics in results["tasks"].items():
        if note := few_images_note(name, metrics["train_images"]):
            typer.echo(note)
    if json_out:
        write_json(json_out, results)


@app.command()
def export(
    model: Path = typer.Option(..., help="Trained model directory."),
    task: Optional[str] = typer.Option(None, help="Export (or re-export) this task alone."),
    all_tasks: bool = typer.Option(False, "--all", help="Export every trained task."),
    out: Path = typer.Option(Path("export"), help="Export directory (created or updated in place)."),
    fmt: ExportFormat = typer.Option(
        ExportFormat.ONNX,
        "--format",
        help="onnx: graphs every target runs; engine: also TensorRT plans for this GPU; "
        "triton: also a Triton model repository in OUT/triton (needs [serve]).",
    ),
    precision: list[str] = typer.Option(["fp32"], help="fp32, fp16 or int8; repeat or comma-separate for several."),
    calib_data: Optional[Path] = typer.Option(None, help="Dataset root whose normal images calibrate INT8."),
    sign: Optional[Path] = typer.Option(
        None, help="Ed25519 private key file (moleflow-edge keygen) that signs the manifest."
    ),
    trusted_key: Optional[list[Path]] = typer.Option(
        None, help="Public key file (repeatable) that may have signed the export already in --out (besides --sign's)."
    ),
    device: str = typer.Option(
        "auto", help=f"GPU that builds TensorRT engines: {DEVICE_OPTION_HELP} ONNX graphs are traced on the CPU."
    ),
) -> None:
    """Merge base + LoRA per task into fused ONNX graphs (and TensorRT engines); update the manifest."""
    from moleflow_edge.export.exporter import export_model

    if (task is None) == (not all_tasks):
        fail("give exactly one of --task NAME or --all")
    engines, triton = fmt is ExportFormat.ENGINE, fmt is ExportFormat.TRITON
    where = chosen_device(
        device, lambda _: "builds the TensorRT engines" if engines else "unused: ONNX graphs are traced on the CPU"
    )
    if engines and where.type != "cuda":
        fail(f"--format engine builds TensorRT engines on the GPU that will run them; --device {device} gave the CPU")
    precisions = [p.strip() for item in precision for p in item.split(",") if p.strip()]
    try:
        report = export_model(model, out, None if all_tasks else [task], precisions, "onnx" if triton else fmt.value,
                              calib_data, sign=sign, device_id=where.index or 0, trusted_keys=trusted_key or ())  # fmt: skip
        repository = _triton_repository(out, precisions[0] if triton else None)
    except UserError as exc:  # TensorRTUnavailable included
        fail(str(exc))
    typer.echo(report.table())
    if repository:
        typer.echo(repository)


def _triton_repository(out: Path, precision: str | None) -> str | None:
    """After an export: write OUT/triton at ``precision`` (--format triton), or rewrite the one an earlier
    --format triton left there with its own options, so that it serves what the manifest now says."""
    from moleflow_edge.serving.triton.decisions import TRITON_FOLDER, RepositoryOptions, pickup_commands, read_options

    repo = out / TRITON_FOLDER
    if precision is None and not repo.exists():
        return None
    from moleflow_edge.serving.triton.repository import write_triton_repository

    options = RepositoryOptions(precision=precision) if precision else read_options(repo)
    written = write_triton_repository(out, repo, options)
    return f"Triton model repository ({options.precision}): {repo}, {len(written)} models\n{pickup_commands(repo)}"


app.command()(run)  # moleflow_edge/run_command.py
app.command()(serve)  # moleflow_edge/serving/command.py: its options are the server's
app.command()(learn)  # moleflow_edge/learn_command.py: its options are LearnOptions'
app.command()(calibrate)  # moleflow_edge/calibrate_command.py


@app.command()
def bench(
    export_dir: Path = typer.Option(..., "--export", help="Export directory to benchmark."),
    backends: Optional[str] = typer.Option(
        None,
        help=f"Comma-separated, from torch-eager, {', '.join(TARGET_NAMES)} (default: all; those missing "
        "here are skipped).",
    ),
    precisions: Optional[str] = typer.Option(
        None, show_default=False, help="Comma-separated precisions (default: bench.run.bench's)."
    ),
    batch: Optional[str] = typer.Option(
        None, show_default=False, help="Comma-separated batch sizes (default: bench.run.bench's)."
    ),
    iters: Optional[int] = typer.Option(
        None,
        min=1,
        show_default=False,
        help="Timed iterations per setting, after warm-up (default: bench.run.bench's).",
    ),
    data: Optional[Path] = typer.Option(None, help="Dataset root: adds image AUROC per backend."),
    model: Optional[Path] = typer.Option(None, help="Model directory: adds the PyTorch eager reference."),
    auroc_floor: Optional[float] = typer.Option(None, help="Fail (exit 1) if any image AUROC is below this."),
    chart: Optional[Path] = typer.Option(None, help="Write the stacked per-stage latency chart (PNG) here."),
    json_out: Optional[Path] = typer.Option(None, "--json", help="Write the results as JSON to this file."),
) -> None:
    """Latency per stage, throughput, memory and AUROC per backend and precision, in one table."""
    from moleflow_edge.bench.pipelines import BACKENDS
    from moleflow_edge.bench.run import BenchError
    from moleflow_edge.bench.run import bench as run_bench

    chosen = tuple(b.strip() for b in backends.split(",")) if backends else BACKENDS
    if unknown := [b for b in chosen if b not in BACKENDS]:
        fail(f"unknown backend {', '.join(unknown)} in --backends; choose from {', '.join(BACKENDS)}")
    writable(json_out, "--json")
    try:
        settings = given(precisions=tuple(precisions.split(",")) if precisions else None, iters=iters,
                         batches=positive_ints(batch, "--batch") if batch else None)  # fmt: skip
        report = run_bench(export_dir, chosen, data_root=data, model_dir=model, auroc_floor=auroc_floor, chart=chart,
                           **settings)  # fmt: skip
    except BenchError as exc:
        typer.secho(f"regression: {exc}", fg=typer.colors.RED, err=True)
        raise typer.Exit(code=1) from None
    except UserError as exc:
        fail(str(exc))
    if json_out:
        write_json(json_out, report)


@app.command()
def keygen(
    out: Path = typer.Option(..., help="Private key file to write; the public key goes beside it as OUT.pub."),
) -> None:
    """Make an Ed25519 key pair: export --sign OUT on the build machine, run --trusted-key OUT.pub on the line."""
    from moleflow_edge.signing import generate_keypair

    writable(out, "--out")
    try:
        private, public = generate_keypair(out)
    except (UserError, OSError) as exc:
        fail(str(exc))
    typer.echo(f"private key {private} (keep it off the line PCs); public key {public} (copy it to them)")


@app.command()
def demo(
    out: Path = typer.Option(Path("demo_out"), help="Folder for the synthetic data, model, export, results and maps."),
    steps: Optional[int] = typer.Option(
        None,
        min=1,
        show_default=False,
        help=f"Most optimiser steps per task (default {QUICK.steps}, --full {FULL.steps}).",
    ),
    full: bool = typer.Option(
        False,
        "--full",
        help=f"The larger run: {FULL.n_train} training images per product, "
        f"{FULL.steps} steps, every bench backend and up to {max(FULL.task_counts)} tasks in the "
        "growth test.",
    ),
    threads: Optional[int] = typer.Option(None, min=1, help=THREADS_OPTION_HELP),
) -> None:
    """Synthetic data -> train 3 products one after another -> eval -> export -> calibrate -> bench -> runtime
    maps; under 3 minutes on 2 idle cores, and it ends by saying where everything is."""
    from moleflow_edge.demo import run_demo

    writable(out, "--out", directory=True)
    try:
        outputs = run_demo(out, FULL if full else QUICK, steps, printer=typer.echo, threads=torch_threads(threads))
    except UserError as exc:
        fail(str(exc))
    typer.echo(outputs.summary())


@app.command()
def doctor(
    export_dir: Optional[Path] = typer.Option(None, "--export", help="Export directory: which targets run it here."),
    json_out: bool = typer.Option(False, "--json", help="Print the report as JSON, for scripts."),
) -> None:
    """What this machine can run: platform, Python, numpy/OpenCV builds, onnxruntime, OpenVINO, TensorRT,
    CUDA, GPU, torch, cameras and every deployment target; exit 1 when something is wrong."""
    from moleflow_edge.doctor import diagnose, format_report

    report = diagnose(export_dir)
    typer.echo(json.dumps(report, indent=2) if json_out else format_report(report))
    raise typer.Exit(0 if report["ok"] else 1)


# a module a command needs but the installed extras lack -> what to install
MISSING_MODULES = {
    "cv2": "pip install 'moleflow-edge[cpu]' (or [gpu]); on a Jetson, JetPack's OpenCV (README, Jetson)",
    "onnxruntime": ONNXRUNTIME_HINT,
    "torch": "pip install torch==2.13.0, then pip install 'moleflow-edge[train,cpu]'",
    "onnx": "pip install 'moleflow-edge[train,cpu]'",
    "onnxscript": "pip install 'moleflow-edge[train,cpu]'",
    "matplotlib": "pip install 'moleflow-edge[bench]'",
    "cryptography": "pip install 'moleflow-edge[sign]'",
    "tritonclient": "pip install 'moleflow-edge[serve]'",
    "pytriton": "pip install 'moleflow-edge[serve]'",
}


def main() -> None:
    """The console script: the app, with a missing optional package turned into what to install."""
    try:
        app()
    except ModuleNotFoundError as exc:
        module = (exc.name or "").split(".")[0]
        if module not in MISSING_MODULES:
            raise
        typer.secho(f"error: {module} is not installed: {MISSING_MODULES[module]}; "
                    "`moleflow-edge doctor` shows what is", fg=typer.colors.RED, err=True)  # fmt: skip
        sys.exit(2)


if __name__ == "__main__":  # pragma: no cover
    main()
