"""One backend table (targets.ENGINES): every engine class is registered there, importable, with the one
constructor signature; Runtime and RemoteRuntime are both InferenceRuntimes; run's outcomes have the exit
codes the README documents. Fast: no model, no export."""

from __future__ import annotations

import inspect
import re
from pathlib import Path

from typer.testing import CliRunner

from moleflow_edge.cli import app
from moleflow_edge.exit_codes import RUN_EXIT_CODES
from moleflow_edge.runtime import InferenceRuntime, RunOutcome, Runtime
from moleflow_edge.runtime.backend import GraphBackend
from moleflow_edge.runtime.backend_factory import engine_class
from moleflow_edge.serving.client import RemoteRuntime
from moleflow_edge.targets import ENGINES, TARGETS, Backend

REPO = Path(__file__).resolve().parents[1]
SIGNATURE = ["root", "manifest", "options"]


def _parameters(function: object) -> list[tuple[str, object]]:
    """(name, kind) of each parameter after ``self``."""
    return [(p.name, p.kind) for p in list(inspect.signature(function).parameters.values())[1:]]  # type: ignore[arg-type]


def test_every_engine_of_the_table_is_an_importable_backend_with_the_one_signature() -> None:
    assert {t.backend for t in TARGETS} <= set(ENGINES), "a target's engine is missing from targets.ENGINES"
    assert Backend.AUTO not in ENGINES  # auto is a choice among the targets, not an engine
    for kind, path in ENGINES.items():
        cls = engine_class(kind)
        assert f"{cls.__module__}:{cls.__qualname__}" == path
        assert issubclass(cls, GraphBackend) and not inspect.isabstract(cls), path
        assert cls.kind is kind, f"{path} says it is {cls.kind}, the table files it under {kind}"
        parameters = _parameters(cls.__init__)
        assert [name for name, _ in parameters] == SIGNATURE, f"{path}{inspect.signature(cls.__init__)}"
        assert all(k is inspect.Parameter.POSITIONAL_OR_KEYWORD for _, k in parameters), path


def _protocol_members() -> set[str]:
    own = {n for n in vars(InferenceRuntime) if not n.startswith("_") or n in ("__enter__", "__exit__")}
    return (own | set(InferenceRuntime.__annotations__)) - {"__annotations__"}


def test_runtime_and_remote_runtime_both_satisfy_the_inference_runtime_protocol() -> None:
    members = _protocol_members()
    assert {"infer", "infer_one", "task_status", "max_map_side", "engine_stats"} <= members
    for cls in (Runtime, RemoteRuntime):
        annotated = {n for klass in cls.__mro__ for n in getattr(klass, "__annotations__", {})}
        for name in sorted(members):
            wanted = inspect.getattr_static(InferenceRuntime, name, None)
            found = inspect.getattr_static(cls, name, None)
            if inspect.isfunction(wanted):
                assert inspect.isfunction(found), f"{cls.__name__}.{name} is not a method"
                own, promised = _parameters(found), _parameters(wanted)
                extra = list(inspect.signature(found).parameters.values())[1 + len(promised) :]
                assert own[: len(promised)] == promised, f"{cls.__name__}.{name}{inspect.signature(found)}"
                assert all(p.default is not p.empty for p in extra), f"{cls.__name__}.{name}: extras need defaults"
            elif isinstance(wanted, property):
                assert isinstance(found, property) or name in annotated, f"{cls.__name__} lacks {name}"
            else:
                assert name in annotated, f"{cls.__name__} does not declare the attribute {name}"


def test_every_run_outcome_has_the_exit_code_the_readme_documents() -> None:
    text = " ".join((REPO / "README.md").read_text().split())
    paragraph = re.search(r"Exit codes (0 done.*?) Ctrl-C", text)
    assert paragraph, "README no longer lists run's exit codes"
    documented = [int(n) for n in re.findall(r"(?:^|, )(\d+) ", paragraph.group(1) + " ")]
    assert documented == [0, 1, 2, 3, 4, 5, 130]
    assert [RUN_EXIT_CODES[outcome] for outcome in RunOutcome] == documented  # the README's order is the enum's


def test_run_on_a_missing_export_exits_1_with_its_summary(tmp_path: Path) -> None:
    source = tmp_path / "frames"
    source.mkdir()
    result = CliRunner().invoke(app, ["run", "--export", str(tmp_path / "nothing"), "--source", str(source)])
    assert result.exit_code == RUN_EXIT_CODES[RunOutcome.LOAD_FAILED] == 1, result.output
    assert "cannot load the export" in result.output and '"outcome": "load_failed"' in result.output
