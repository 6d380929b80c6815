"""`moleflow-edge doctor`: what this machine can run, found before a command fails halfway.

Reports the platform, Python, the numpy and OpenCV builds (video I/O: FFmpeg, GStreamer, V4L2),
onnxruntime and its providers, OpenVINO, TensorRT, CUDA and the GPU, whether torch is present,
camera devices, every deployment target of moleflow_edge/targets.py with why it is or is not
usable, and, for an export directory, which targets can run that export here. Problems (two
onnxruntime builds, no inference engine, an export no target can run) make ``ok`` false.
Never imports torch: a line PC has none, and importing it costs seconds.
"""

from __future__ import annotations

import platform
import re
import shutil
import subprocess
import sys
from pathlib import Path

from moleflow_edge.targets import (
    ONNXRUNTIME_DISTRIBUTIONS,
    ONNXRUNTIME_HINT,
    TARGETS,
    ExportFormat,
    Target,
    installed,
    module_available,
    not_installed,
)

OPENCV_DISTRIBUTIONS = ("opencv-python", "opencv-python-headless", "opencv-contrib-python",
                        "opencv-contrib-python-headless")  # fmt: skip
CUDA_KEYS = ("driver", "runtime", "driver_cuda", "toolkit")  # driver_cuda: what nvidia-smi says the driver supports
JETSON_CAPABILITY = {"Orin": "87", "Xavier": "72"}  # every module of a family has the same GPU architecture


def _read(path: str) -> str | None:
    try:
        return Path(path).read_text(errors="replace").replace("\x00", "").strip()
    except OSError:
        return None


def platform_info() -> dict:
    model = _read("/proc/device-tree/model")
    tegra = _read("/etc/nv_tegra_release")
    return {
        "system": platform.system(),
        "release": platform.release(),
        "machine": platform.machine(),
        "jetson": model if model and ("Jetson" in model or tegra) else None,
        "l4t": tegra.splitlines()[0].lstrip("# ") if tegra else None,
    }


def python_info() -> dict:
    """A Jetson venv needs system site packages to see JetPack's tensorrt and cv2."""
    config = _read(str(Path(sys.prefix) / "pyvenv.cfg")) or ""
    return {
        "version": platform.python_version(),
        "executable": sys.executable,
        "venv": sys.prefix != sys.base_prefix,
        "system_site_packages": "include-system-site-packages = true" in config,
    }


def numpy_info() -> dict:
    import numpy

    return {"version": numpy.__version__, "path": str(Path(numpy.__file__).parent)}


def opencv_info() -> dict:
    """The cv2 that imports (pip's wheel or JetPack's build) and what it can read."""
    wheels = {d: v for d in OPENCV_DISTRIBUTIONS if (v := installed(d))}
    try:
        import cv2
    except ImportError as exc:  # missing, or built against another numpy major version
        return {"importable": False, "error": str(exc), "distributions": wheels}
    from moleflow_edge.runtime.video_io import video_io

    io = video_io()
    return {
        "importable": True,
        "version": cv2.__version__,
        "path": str(Path(cv2.__file__).parent),
        "distributions": wheels,
        "video_io": io,
        "ffmpeg": io.get("FFMPEG", "NO").startswith("YES"),
        "gstreamer": io.get("GStreamer", "NO").startswith("YES"),
    }


def onnxruntime_info() -> dict:
    builds = {d: v for d in ONNXRUNTIME_DISTRIBUTIONS if (v := installed(d))}
    info: dict = {"distributions": builds, "importable": False}
    if not module_available("onnxruntime"):
        return info
    try:
        import onnxruntime as ort
    except ImportError as exc:
        return info | {"error": str(exc)}
    return info | {"importable": True, "version": ort.__version__, "providers": ort.get_available_providers()}


def openvino_info() -> dict | None:
    if not module_available("openvino"):
        return None
    try:
        import openvino as ov

        return {"version": ov.__version__, "devices": list(ov.Core().available_devices)}
    except Exception as exc:  # a broken install is reported, not raised
        return {"error": str(exc)}


def tensorrt_info() -> dict | None:
    if not module_available("tensorrt"):
        return None
    try:
        import tensorrt as trt

        return {"version": trt.__version__}
    except Exception as exc:
        return {"error": str(exc)}


def gpu_info(plat: dict) -> dict:
    """CUDA versions and GPUs (name, compute capability), from cuda-python, else nvidia-smi, else
    the Jetson's device tree."""
    info: dict = {"cuda_python": installed("cuda-python") or installed("cuda-bindings"), "gpus": []}
    try:
        from moleflow_edge.runtime import cuda_memory as cm
    except ImportError as exc:  # the runtime package needs OpenCV; reported as a problem of its own
        cm, info["error"] = None, f"runtime not importable: {exc}"
    if cm is not None and cm.cuda_available():
        rt = cm.cudart
        try:
            info["driver"] = _cuda_version(cm.check_cuda(rt.cudaDriverGetVersion()))
            info["runtime"] = _cuda_version(cm.check_cuda(rt.cudaRuntimeGetVersion()))
            for device in range(cm.device_count()):
                props = cm.check_cuda(rt.cudaGetDeviceProperties(device))
                name = props.name.decode() if isinstance(props.name, bytes) else str(props.name)
                info["gpus"].append({"name": name.strip("\x00 "), "compute_capability": f"{props.major}{props.minor}"})
        except cm.CudaError as exc:
            info["error"] = str(exc)
    if not info["gpus"] and shutil.which("nvidia-smi"):
        info |= _nvidia_smi()
    if not info["gpus"] and plat["jetson"]:
        family = next((f for f in JETSON_CAPABILITY if f in plat["jetson"]), None)
        info["gpus"].append({"name": plat["jetson"], "compute_capability": JETSON_CAPABILITY.get(family or "")})
    if "runtime" not in info and (version := _read("/usr/local/cuda/version.json")):
        match = re.search(r'"cuda"\s*:\s*\{[^}]*"version"\s*:\s*"([\d.]+)"', version)
        info["toolkit"] = match.group(1) if match else None
    return info


def _cuda_version(number: int) -> str:
    return f"{number // 1000}.{number % 1000 // 10}"


def _nvidia_smi() -> dict:
    query = ["nvidia-smi", "--query-gpu=name,compute_cap,driver_version", "--format=csv,noheader"]
    try:
        rows = subprocess.run(query, capture_output=True, text=True, timeout=10, check=True).stdout
        header = subprocess.run(["nvidia-smi"], capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.SubprocessError) as exc:
        return {"error": f"nvidia-smi failed: {exc}"}
    gpus = []
    for row in rows.strip().splitlines():
        name, capability, driver = (field.strip() for field in row.split(","))
        gpus.append({"name": name, "compute_capability": capability.replace(".", ""), "driver": driver})
    match = re.search(r"CUDA Version:\s*([\d.]+)", header)
    return {"gpus": gpus, "driver_cuda": match.group(1) if match else None}


def serving_info() -> dict:
    """Whether `moleflow-edge serve` can start tritonserver here (serving/libpython.py says why not)."""
    from moleflow_edge.serving.libpython import interpreter_libpython, serving_problem

    why = serving_problem()
    library = interpreter_libpython()
    return {"usable": why is None, "why_not": why, "pytriton": installed("nvidia-pytriton"),
            "tritonclient": installed("tritonclient"),
            "libpython": None if library is None else str(library)}  # fmt: skip


def cameras() -> list[dict]:
    """V4L2 devices (USB cameras; CSI cameras on a Jetson too), with the name the driver gives."""
    found = []
    for device in sorted(Path("/dev").glob("video*"), key=lambda p: (len(p.name), p.name)):
        name = _read(f"/sys/class/video4linux/{device.name}/name")
        found.append({"device": str(device), "name": name, "source": f"camera:{device.name[5:]}"})
    return found


def target_status(target: Target, gpus: list[dict]) -> str | None:
    """Why ``target`` cannot run anything here, None when it is installed and has its device."""
    reason = not_installed(target)
    if reason is None and target.device == "nvidia-gpu" and not gpus:
        reason = "no NVIDIA GPU found (no cuda-python device, no nvidia-smi, not a Jetson)"
    return reason


def export_status(export_dir: Path, gpus: list[dict], trt_version: str | None) -> dict:
    """Which targets can run this export here: the manifest and every file's hash are checked, each
    target that passes the static checks is loaded for real (backbone and router)."""
    from moleflow_edge.contract import ManifestError, load_manifest
    from moleflow_edge.runtime import BackendError, Runtime, RuntimeOptions

    try:
        manifest = load_manifest(export_dir, verify=True)
    except (ManifestError, OSError) as exc:
        return {"dir": str(export_dir), "error": str(exc), "targets": []}
    precisions = sorted(p.value for p in manifest.backbone_graphs)
    engines = sorted({(e.tensorrt_version, e.compute_capability) for e in manifest.engines.values()})
    capabilities = {g.get("compute_capability") for g in gpus}
    rows = []
    for target in TARGETS:
        usable = [p.value for p in target.precisions if p.value in precisions]
        reason = target_status(target, gpus)
        if reason is None and not usable:
            reason = f"the export has none of its precisions ({', '.join(p.value for p in target.precisions)})"
        if reason is None and target.export_format is ExportFormat.ENGINE:
            matching = [e for e in engines if e[0] == trt_version and e[1] in capabilities]
            if not matching:
                built = ", ".join(f"TensorRT {v} sm{c}" for v, c in engines) or "none"
                reason = (f"no TensorRT engines for TensorRT {trt_version} on sm{'/'.join(map(str, capabilities))} "
                          f"(built: {built}): run export --format engine on this device")  # fmt: skip
        if reason is None:
            try:
                Runtime.load(export_dir, RuntimeOptions(target.name, usable[0])).close()
            except (BackendError, ManifestError, ValueError, OSError) as exc:
                reason = f"failed to load: {exc}"
        rows.append({"target": target.name, "can_run": reason is None, "precisions": usable if reason is None else [],
                     "why_not": reason})  # fmt: skip
    return {"dir": str(export_dir), "tasks": manifest.task_names, "precisions": precisions,
            "engines": [{"tensorrt": v, "compute_capability": c} for v, c in engines], "targets": rows}  # fmt: skip


def diagnose(export_dir: Path | None = None) -> dict:
    """The whole report, JSON-ready. ``ok`` is false when ``problems`` is not empty."""
    plat = platform_info()
    report: dict = {"platform": plat, "python": python_info(), "numpy": numpy_info(), "opencv": opencv_info()}
    report |= {"onnxruntime": onnxruntime_info(), "openvino": openvino_info(), "tensorrt": tensorrt_info()}
    report["cuda"] = gpu_info(plat)
    report["torch"] = {"present": module_available("torch"), "version": installed("torch")}
    report["cameras"] = cameras()
    report["serving"] = serving_info()
    gpus = report["cuda"]["gpus"]
    report["targets"] = [{"target": t.name, "usable": (why := target_status(t, gpus)) is None, "why_not": why,
                          "install": t.install} for t in TARGETS]  # fmt: skip
    problems, warnings = _findings(report)
    if export_dir is not None:
        trt = report["tensorrt"] or {}
        report["export"] = export_status(Path(export_dir), gpus, trt.get("version"))
        if "error" in report["export"]:
            problems.append(f"export refused: {report['export']['error']}")
        elif not any(row["can_run"] for row in report["export"]["targets"]):
            problems.append(f"no target can run {export_dir} here (see export.targets for why)")
    report |= {"ok": not problems, "problems": problems, "warnings": warnings}
    return report


def _findings(report: dict) -> tuple[list[str], list[str]]:
    problems, warnings = [], []
    builds = report["onnxruntime"]["distributions"]
    if len(builds) > 1:
        names = " ".join(builds)
        problems.append(
            f"{len(builds)} onnxruntime builds are installed ({', '.join(builds)}): they overwrite each other's "
            f"onnxruntime module, so providers go missing. pip uninstall -y {names}, then install one: "
            f"{ONNXRUNTIME_HINT}"
        )
    if not report["opencv"]["importable"]:
        problems.append(
            f"OpenCV does not import ({report['opencv']['error']}): pip install 'moleflow-edge[cpu]' or [gpu]; "
            "on a Jetson, JetPack's OpenCV with numpy<2 (README, Jetson)"
        )
    elif len(report["opencv"]["distributions"]) > 1:
        warnings.append(f"several OpenCV wheels installed ({', '.join(report['opencv']['distributions'])}): "
                        "they share the cv2 module; keep one")  # fmt: skip
    if report["opencv"].get("importable") and not report["opencv"]["gstreamer"]:
        warnings.append("this OpenCV has no GStreamer: run --source takes no GStreamer pipeline (CSI cameras); "
                        "stream URLs and V4L2 cameras still work")  # fmt: skip
    if not any(row["usable"] for row in report["targets"]):
        problems.append("no deployment target is usable here: " + "; ".join(
            f"{row['target']}: {row['why_not']}" for row in report["targets"]))  # fmt: skip
    gpu_targets = [t.name for t in TARGETS if t.device == "nvidia-gpu"]
    if report["cuda"]["gpus"] and not any(r["usable"] for r in report["targets"] if r["target"] in gpu_targets):
        warnings.append("an NVIDIA GPU is here but no GPU target is usable: pip install 'moleflow-edge[gpu]' "
                        "(after uninstalling onnxruntime) or [tensorrt]")  # fmt: skip
    if not report["cameras"]:
        warnings.append("no camera device (/dev/video*) found")
    return problems, warnings


def format_report(report: dict) -> str:
    """The report for people: one line per component, a table of targets, then problems and warnings."""
    plat, py, cv, ort, gpu = (report[k] for k in ("platform", "python", "opencv", "onnxruntime", "cuda"))
    lines = [
        f"platform     {plat['system']} {plat['release']} {plat['machine']}"
        + (f"  ({plat['jetson']}, {plat['l4t']})" if plat["jetson"] else ""),
        f"python       {py['version']} {py['executable']}" + ("  (venv)" if py["venv"] else ""),
        f"numpy        {report['numpy']['version']}",
        "opencv       " + (f"{cv['version']} ({', '.join(cv['distributions']) or cv['path']}): "
                           f"FFmpeg {_yes(cv['ffmpeg'])}, GStreamer {_yes(cv['gstreamer'])}, "
                           f"V4L2 {cv['video_io'].get('v4l/v4l2', 'NO')}"
                           if cv["importable"] else f"MISSING ({cv['error']})"),
        "onnxruntime  " + (f"{ort['version']} ({', '.join(ort['distributions'])}): {', '.join(ort['providers'])}"
                           if ort["importable"] else "not installed"),
        f"openvino     {_component(report['openvino'])}",
        f"tensorrt     {_component(report['tensorrt'])}",
        "cuda         " + (", ".join(f"{k} {gpu[k]}" for k in CUDA_KEYS if gpu.get(k)) or "none found")
        + (f"  (cuda-python {gpu['cuda_python']})" if gpu["cuda_python"] else ""),
        "gpu          " + ("; ".join(f"{g['name']} (sm{g['compute_capability']})" for g in gpu["gpus"])
                           or "none found"),
        "torch        " + (report["torch"]["version"] or "present" if report["torch"]["present"] else "not installed"),
        "serving      " + (f"yes: nvidia-pytriton {report['serving']['pytriton']}, tritonclient "
                           f"{report['serving']['tritonclient']}; the stub loads {report['serving']['libpython']}"
                           if report["serving"]["usable"] else f"no: {report['serving']['why_not']}"),
        "cameras      " + (", ".join(f"{c['source']} {c['name'] or ''}".strip() for c in report["cameras"])
                           or "none found"),
        "",
        "targets (moleflow_edge/targets.py, best first):",
    ]  # fmt: skip
    lines += [f"  {'ok ' if r['usable'] else 'no '} {r['target']:<22} {r['why_not'] or ''}" for r in report["targets"]]
    export = report.get("export")
    if export is not None:
        lines += ["", f"export {export['dir']}:"]
        if "error" in export:
            lines.append(f"  refused: {export['error']}")
        else:
            lines.append(f"  tasks {', '.join(export['tasks'])}; precisions {', '.join(export['precisions'])}")
            machine = {r["target"]: r["why_not"] for r in report["targets"]}
            for r in export["targets"]:
                why = "not usable here (above)" if r["why_not"] == machine[r["target"]] else r["why_not"]
                lines.append(f"  {'runs' if r['can_run'] else 'no  '} {r['target']:<22} "
                             + (", ".join(r["precisions"]) if r["can_run"] else why))  # fmt: skip
    lines += [""] + [f"problem: {p}" for p in report["problems"]] + [f"warning: {w}" for w in report["warnings"]]
    lines.append("ok" if report["ok"] else f"{len(report['problems'])} problem(s)")
    return "\n".join(lines)


def _yes(flag: bool) -> str:
    return "yes" if flag else "no"


def _component(info: dict | None) -> str:
    if info is None:
        return "not installed"
    return f"broken ({info['error']})" if "error" in info else " ".join(
        [info["version"], *(["devices: " + ", ".join(info["devices"])] if info.get("devices") else [])])  # fmt: skip
