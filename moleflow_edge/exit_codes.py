"""The command line's exit codes (README, run; docs/serving.md, serve). The runtime says how a run ended (RunOutcome); the
command line says it with a number, here, so that a script or a service manager can tell the cases apart."""

from __future__ import annotations

from moleflow_edge.runtime.camera_loop import RunOutcome

EXIT_OK = 0
EXIT_LOAD_ERROR = 1  # the export cannot be loaded (missing, tampered, no backend); serve: could not start
EXIT_SOURCE_ERROR = 2  # the source cannot be opened or holds no image
EXIT_CAMERA_LOST = 3  # a camera, a stream or the inference server (run --server) stopped and did not come back
EXIT_BACKEND_ERROR = 4  # the inference engine failed mid-run (device lost, out of memory)
EXIT_ALL_FRAMES_FAILED = 5  # frames were read, but not one of them could be processed
EXIT_UNANSWERED = 6  # serve: the drain timeout passed before every accepted request was answered
EXIT_INTERRUPTED = 130  # Ctrl-C (128 + SIGINT), after the summary

RUN_EXIT_CODES: dict[RunOutcome, int] = {
    RunOutcome.DONE: EXIT_OK,
    RunOutcome.LOAD_FAILED: EXIT_LOAD_ERROR,
    RunOutcome.SOURCE_UNREADABLE: EXIT_SOURCE_ERROR,
    RunOutcome.LOST: EXIT_CAMERA_LOST,
    RunOutcome.ENGINE_FAILED: EXIT_BACKEND_ERROR,
    RunOutcome.ALL_FRAMES_FAILED: EXIT_ALL_FRAMES_FAILED,
    RunOutcome.INTERRUPTED: EXIT_INTERRUPTED,
}
