"""`moleflow-edge serve`: a real Triton Inference Server (PyTriton's bundled tritonserver) whose model
``moleflow`` is the lean runtime, and ``moleflow_info`` says what it serves.

Triton does the serving: HTTP and gRPC endpoints, health and readiness, Prometheus metrics, and a
dynamic batcher that merges requests from many cameras; each merged batch reaches ``_infer`` as
a list of requests, and every frame of them goes through one Runtime.infer call. ``moleflow`` itself
is a small Python-backend model in front (serving/triton/models/guard_model.py): it answers frames PyTriton
cannot carry (a zero-length side) with one error each, and forwards the rest to ``_infer``'s PyTriton
model ``moleflow_core``.

Ready means ready: a warm-up frame runs through the backbone, every task's detector and the serving
path before tritonserver starts, and tritonserver loads both models before it opens its ports, so
/v2/health/ready never answers 200 before a request can be answered. SIGTERM (or Ctrl-C) drains:
Triton unloads the models (from that moment readiness fails and new requests are refused; Triton
answers every request it had accepted before the unload finishes), serve waits for that up to the
drain timeout, then stops tritonserver. ``_infer`` counts the requests it took and answered, so
the exit status says whether every accepted request was answered. A watchdog process (watchdog.py)
removes tritonserver, its stubs, their shared memory and the workspace whenever serve ends.
"""

from __future__ import annotations

import http.client
import json
import logging
import signal
import sys
import threading
import time
import traceback
import urllib.error
import urllib.request
from collections.abc import Callable, Sequence
from pathlib import Path
from types import FrameType
from typing import Any

import numpy as np

from moleflow_edge.contract import ManifestError
from moleflow_edge.exit_codes import EXIT_BACKEND_ERROR, EXIT_LOAD_ERROR, EXIT_UNANSWERED
from moleflow_edge.runtime.backend import BackendError
from moleflow_edge.runtime.live_export import LiveExport
from moleflow_edge.runtime.options import RuntimeOptions
from moleflow_edge.runtime.result import FrameResult
from moleflow_edge.runtime.runtime import Runtime
from moleflow_edge.serving.libpython import ServingUnavailable, prepare_stub_environment, serving_problem
from moleflow_edge.serving.options import ServeOptions
from moleflow_edge.serving.protocol import (
    CORE_MODEL,
    ENCODED,
    IMAGES,
    INFO,
    INFO_MODEL,
    INFO_QUERY,
    MAP_SIDE_PARAMETER,
    MODEL,
    OUTPUTS,
    answer_requests,
    describe,
    encode_results,
)
from moleflow_edge.serving.triton.models.guard_model import write_guard
from moleflow_edge.serving.watchdog import Watchdog

__all__ = ["InferenceServer", "ServeOptions", "model_metrics", "serve_export"]

# tritonserver's --exit-timeout-secs, which only applies after the drain (nothing is in flight then):
# how long idle keep-alive connections may hold its exit before they are cut
TRITON_EXIT_TIMEOUT_S = 5


def model_metrics(host: str, metrics_port: int, model: str = MODEL) -> dict[str, float]:
    """Triton's Prometheus figures for ``model`` by name: ``nv_inference_pending_request_count``
    (accepted, not yet handed to the model), ``nv_inference_request_success`` (answered), ..."""
    text = urllib.request.urlopen(f"http://{host}:{metrics_port}/metrics", timeout=5).read().decode()
    rows = [r for r in text.splitlines() if r.startswith("nv_inference_") and f'model="{model}"' in r]
    return {r.split("{", 1)[0]: float(r.split()[-1]) for r in rows}


class InferenceServer:
    """A loaded Runtime behind a Triton server, switching to a newly committed export between batches
    (LiveExport). ``warm_up``, then ``start`` (returns once Triton is ready); ``wait`` blocks until
    SIGTERM or SIGINT, ``drain`` stops it the way SIGTERM promises, ``stop`` stops it without a drain
    (also on leaving a with block)."""

    def __init__(self, live: LiveExport, options: ServeOptions) -> None:
        self.live = live
        self.options = options
        live.runtime.max_map_side = options.map_side_cap  # maps are made at the cap, shrunk per request
        self._triton: Any = None
        self._watchdog: Watchdog | None = None
        self._stop_requested = threading.Event()
        self._holding, self._held, self._release = threading.Event(), threading.Event(), threading.Event()
        self._previous_handlers: dict[int, Any] = {}
        self._count_lock = threading.Lock()
        self.accepted = self.answered = 0  # requests ``_infer`` took, and those it gave back an answer for

    def warm_up(self) -> float:
        """A frame through the backbone and every task's detector, then one through the serving path
        with a map; the milliseconds it took. Before Triton starts, so that ready means warm."""
        started = time.perf_counter()
        with self.live.use() as runtime:
            size, cap = runtime.image_size, self.options.map_side_cap
            frame = np.full((1, size, size, 3), 127, np.uint8)
            for task in runtime.tasks:
                runtime.score_as(frame, task)
            answer_requests(runtime, [({IMAGES: frame}, {MAP_SIDE_PARAMETER: cap})], cap)
        return (time.perf_counter() - started) * 1e3

    def start(self) -> None:
        prepare_stub_environment()
        from pytriton.model_config import DynamicBatcher, ModelConfig, Tensor
        from pytriton.triton import Triton, TritonConfig, TritonLifecyclePolicy
        from pytriton.utils.workspace import Workspace

        o = self.options
        config = TritonConfig(
            http_address=o.address, http_port=o.http_port, grpc_address=o.address, grpc_port=o.grpc_port,
            metrics_address=o.address, metrics_port=o.metrics_port, exit_timeout_secs=TRITON_EXIT_TIMEOUT_S,
        )  # fmt: skip
        logging.getLogger("pytriton").setLevel(logging.WARNING)
        self._watchdog = Watchdog()  # before anything it must clean up exists
        # a local model store: tritonserver loads every model in it (the guard too) before it opens its ports
        policy = TritonLifecyclePolicy(launch_triton_on_startup=True, local_model_store=True)
        workspace = Workspace(self._watchdog.workspace)
        write_guard(workspace.model_store_path, CORE_MODEL, o.max_batch, o.max_queue_delay_us)
        self._triton = Triton(config=config, workspace=workspace, triton_lifecycle_policy=policy)
        outputs = [Tensor(name=name, dtype=dtype, shape=shape) for name, (dtype, shape) in OUTPUTS.items()]
        self._triton.bind(  # the guard forwards a batch's requests at once: this batcher merges them again
            model_name=CORE_MODEL,
            infer_func=self._infer,
            inputs=[
                Tensor(name=IMAGES, dtype=np.uint8, shape=(-1, -1, 3), optional=True),
                Tensor(name=ENCODED, dtype=np.bytes_, shape=(1,), optional=True),
            ],
            outputs=outputs,
            config=ModelConfig(
                max_batch_size=o.max_batch, batcher=DynamicBatcher(max_queue_delay_microseconds=o.max_queue_delay_us)
            ),
        )
        self._triton.bind(
            model_name=INFO_MODEL,
            infer_func=self._info,
            inputs=[Tensor(name=INFO_QUERY, dtype=np.bytes_, shape=(1,))],
            outputs=[Tensor(name=INFO, dtype=np.bytes_, shape=(1,))],
            config=ModelConfig(batching=False),
        )
        self._triton.run()

    def wait(self) -> bool:
        """Serve until SIGTERM or SIGINT: True; False when tritonserver died first. Later signals are
        ignored until ``drain`` or ``stop`` is done, so that a second Ctrl-C does not cut them short."""

        def request_stop(signum: int, _: FrameType | None) -> None:
            self._stop_requested.set()

        self._previous_handlers = {s: signal.signal(s, request_stop) for s in (signal.SIGTERM, signal.SIGINT)}
        while not self._stop_requested.wait(0.5) and self._triton.is_alive():
            pass
        return self._stop_requested.is_set()

    def drain(self) -> int:
        """Stop the way SIGTERM promises; how many accepted requests were not answered.

        Triton unloads both models: readiness fails and new requests are refused at once, and the
        unload of ``moleflow`` finishes only once every request Triton accepted for it is answered
        (through ``moleflow_core``, which stays loaded for them), which is waited for (up to the drain timeout). Then tritonserver stops. So that readiness
        never turns 200 again in between (an unloaded model no longer counts against it), serve
        holds one request of its own in ``moleflow_info`` until tritonserver has closed its ports.
        """
        from pytriton.triton import TRITON_ACCESS_HEADER
        from tritonclient.http import InferenceServerClient
        from tritonclient.utils import InferenceServerException

        o = self.options
        url, headers = f"{o.local_host}:{o.http_port}", {TRITON_ACCESS_HEADER: self._triton.get_access_token()}
        holder = threading.Thread(target=self._hold_readiness, args=(url,), daemon=True)
        holder.start()
        self._held.wait(10.0)
        client = InferenceServerClient(url, network_timeout=10.0)
        cut: int | None = None  # accepted requests not answered when the drain timeout passed
        unloaded = False
        try:
            for model in (MODEL, INFO_MODEL):
                client.unload_model(model, headers=headers)
            deadline = time.monotonic() + o.drain_timeout_s
            while not (unloaded := self._unloaded(client, headers)) and time.monotonic() < deadline:
                time.sleep(0.02)
            if not unloaded:  # taken by serve but not answered by Triton, or still queued: cut from here on
                core, front = (model_metrics(o.local_host, o.metrics_port, m) for m in (CORE_MODEL, MODEL))
                with self._count_lock:
                    cut = self.accepted - round(core.get("nv_inference_request_success", 0.0))
                cut += sum(round(f.get("nv_inference_pending_request_count", 0.0)) for f in (core, front))
                # a batch on its way from Triton to serve is seen by neither; the unload says one is left
                cut = max(cut, 1)
        except (OSError, InferenceServerException) as exc:  # tritonserver went away during the drain
            print(f"serve: the drain could not reach tritonserver ({type(exc).__name__}: {exc})", file=sys.stderr)
        finally:
            client.close()
        if not unloaded and self._watchdog is not None:
            self._watchdog.finish()  # the drain timeout passed: tritonserver and its stubs killed at once
            self._watchdog = None
        stopper = threading.Thread(target=self.stop)
        stopper.start()  # SIGINT at once: tritonserver refuses new connections from then on
        _wait_refused(url, TRITON_EXIT_TIMEOUT_S)
        self._release.set()
        holder.join(TRITON_EXIT_TIMEOUT_S)
        stopper.join()
        self.stop()  # in this (the main) thread: the signal handlers back
        with self._count_lock:
            return cut if cut is not None else self.accepted - self.answered

    def _hold_readiness(self, url: str) -> None:
        """One info request that ``_info`` keeps (``_held``) until ``_release``: see ``drain``."""
        from tritonclient.http import InferenceServerClient, InferInput

        self._holding.set()
        query = InferInput(INFO_QUERY, [1], "BYTES")
        query.set_data_from_numpy(np.array([b""], np.object_))
        client = InferenceServerClient(url, network_timeout=self.options.drain_timeout_s + 60)
        try:
            client.infer(INFO_MODEL, [query])
        except Exception:  # noqa: BLE001 - whatever the transport raises, tritonserver went away: nothing to hold
            pass
        finally:
            client.close()

    @staticmethod
    def _unloaded(client: Any, headers: dict[str, str]) -> bool:
        """Whether Triton finished unloading ``moleflow``: every request it accepted for it was answered."""
        index = client.get_model_repository_index(headers=headers)
        return not any(m["name"] == MODEL and m.get("state") in ("READY", "UNLOADING") for m in index)

    def stop(self) -> None:
        """Stop tritonserver (SIGINT: what is in flight after its exit timeout is cut), then let the watchdog
        remove what is left."""
        if self._triton is not None:
            self._triton.stop()  # SIGINT to tritonserver, then PyTriton removes its workspace
            self._triton = None
        if self._watchdog is not None:
            self._watchdog.finish()
            self._watchdog = None
        if threading.current_thread() is threading.main_thread():
            for s, handler in self._previous_handlers.items():
                signal.signal(s, handler)
            self._previous_handlers = {}

    def __enter__(self) -> InferenceServer:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # --- the models ------------------------------------------------------------------------------
    def _info(self, requests: list[Any]) -> list[dict[str, np.ndarray]]:
        if self._holding.is_set() and not self._held.is_set():  # drain's own request: keep it
            self._held.set()
            self._release.wait(self.options.drain_timeout_s + 60)
        with self.live.use() as runtime:  # also which export scored which frames (LiveExport.summary)
            info = describe(runtime, self.options.max_batch, self.options.map_side_cap) | self.live.summary()
        text = json.dumps(info).encode()
        return [{INFO: np.array([text], np.bytes_)} for _ in requests]

    def _infer(self, requests: list[Any]) -> list[dict[str, np.ndarray]]:
        """One dynamic batch: every request's frames through one Runtime.infer, split back per request,
        on the export current when it starts (a newly committed one is switched to first). Counted in
        and out; whatever fails is one line on each frame, never a traceback to a client."""
        with self._count_lock:
            self.accepted += len(requests)
        try:
            with self.live.use() as runtime:
                answers = answer_requests(
                    runtime, [(r.data, r.parameters) for r in requests], self.options.map_side_cap
                )
                first = self.live.scored
                self.live.record(range(first, first + sum(len(a["task"]) for a in answers)))
            return answers
        except Exception as exc:  # noqa: BLE001 - the boundary to the clients: the traceback stays in serve's log
            traceback.print_exc()
            why = f"the server failed on this batch: {type(exc).__name__}: {exc}".splitlines()[0]
            tasks = self.live.runtime.tasks
            return [encode_results([FrameResult(index=k, error=why) for k in range(_batch(r.data))], tasks)
                    for r in requests]  # fmt: skip
        finally:
            with self._count_lock:
                self.answered += len(requests)


def _wait_refused(url: str, timeout_s: float) -> None:
    """Until tritonserver at ``url`` no longer answers new connections (it got its SIGINT), at most ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            urllib.request.urlopen(f"http://{url}/v2/health/live", timeout=1.0).close()
        except urllib.error.HTTPError:
            pass  # answered: still taking connections
        except (OSError, http.client.HTTPException):
            return
        time.sleep(0.01)


def _batch(inputs: dict[str, np.ndarray]) -> int:
    """How many frames a request holds."""
    return max(len(inputs[name]) for name in (IMAGES, ENCODED) if inputs.get(name) is not None) if inputs else 0


def serve_export(
    export_dir: str | Path,
    options: ServeOptions,
    say: Callable[[str], None],
    *,
    backend: str = "auto",
    precision: str | None = None,
    trusted_keys: Sequence[str | Path] | None = None,
) -> int:
    """`moleflow-edge serve`: check and load the export (signature with ``trusted_keys``, every task's
    graph), warm up, start Triton, serve until SIGTERM or SIGINT, switching to an export newly committed
    to the folder between batches (LiveExport), then drain. Returns the exit code: 0 when every accepted
    request was answered, 1 when it could not start, 4 when tritonserver died, 6 (EXIT_UNANSWERED)
    when the drain timeout passed first. What goes wrong is one line through
    ``say``, never a traceback."""
    try:
        problem = serving_problem()
        if problem is not None:
            raise ServingUnavailable(problem)
        keys = None if trusted_keys is None else tuple(trusted_keys)
        runtime = Runtime.load(
            export_dir, RuntimeOptions(backend, precision, trusted_keys=keys, max_map_side=options.map_side_cap)
        )
    except ServingUnavailable as exc:
        say(f"error: cannot serve here: {exc}")
        return EXIT_LOAD_ERROR
    except (ManifestError, BackendError, ValueError, OSError) as exc:
        say(f"error: cannot load the export {export_dir}: {exc}")
        return EXIT_LOAD_ERROR
    with LiveExport(runtime, say) as live:  # closes the runtime current at the end
        try:
            runtime.check_graphs()
        except BackendError as exc:
            say(f"error: {exc}")
            return EXIT_LOAD_ERROR
        server = InferenceServer(live, options)
        try:
            say(f"warm-up: a frame through the backbone, {len(runtime.tasks)} detectors and the serving path "
                f"in {server.warm_up():.0f} ms")  # fmt: skip
        except (BackendError, ManifestError, OSError) as exc:
            say(f"error: the warm-up frame failed: {exc}")
            return EXIT_LOAD_ERROR
        try:
            server.start()
        except Exception as exc:  # tritonserver failed to start or load the model: its log above says more
            server.stop()
            say(f"error: tritonserver did not start ({type(exc).__name__}: {exc}); its log above says why")
            return EXIT_LOAD_ERROR
        o = options
        say(
            f"serving {', '.join(runtime.tasks)} on {runtime.description}: model {MODEL} at http {o.address}:{o.http_port}, "
            f"grpc {o.address}:{o.grpc_port}, metrics {o.address}:{o.metrics_port} (max batch {o.max_batch}, "
            f"queue delay {o.max_queue_delay_us} us); ready. SIGTERM or Ctrl-C drains it (up to {o.drain_timeout_s:g} s)"
        )
        if not server.wait():
            server.stop()
            lost = server.accepted - server.answered
            say(
                f"error: tritonserver stopped unexpectedly ({lost} accepted requests not answered); its log above says why"
            )
            return EXIT_BACKEND_ERROR
        say("draining: not ready, refusing new requests, answering the accepted ones")
        unanswered = server.drain()
    if unanswered:
        say(f"error: {unanswered} accepted requests were not answered within the drain timeout "
            f"({options.drain_timeout_s:g} s; {server.answered} were)")  # fmt: skip
        return EXIT_UNANSWERED
    say(f"stopped: every accepted request was answered ({server.answered})")
    return 0
