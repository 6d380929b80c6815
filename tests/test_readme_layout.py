"""The README's layout section and docs/architecture.md's package layout name the tree as it is: every
path listed exists, and every top-level module and package of moleflow_edge/ is listed, so neither
can go stale when a module is added, moved or deleted. Fast: reads text and lists files."""

from __future__ import annotations

import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PACKAGE = REPO / "moleflow_edge"


def _section(text: str, heading: str) -> str:
    """The body of the ``## heading`` section of a markdown text, up to the next ``## `` heading."""
    match = re.search(rf"^## {re.escape(heading)}\n(.*?)(?=^## |\Z)", text, re.MULTILINE | re.DOTALL)
    assert match, f"no '## {heading}' section"
    return match.group(1)


def _readme_layout() -> list[str]:
    """The backticked names in the README layout section's bullet list (the prose above it names commands)."""
    section = _section((REPO / "README.md").read_text(), "How the code is laid out")
    bullets = section[section.index("\n- ") :]
    return re.findall(r"`([^`\s]+)`", bullets)


def _top_level() -> set[str]:
    """moleflow_edge's own modules (``x.py``) and packages (``x/``), as the layout writes them."""
    modules = {p.name for p in PACKAGE.glob("*.py") if p.name != "__init__.py"}
    packages = {f"{p.name}/" for p in PACKAGE.iterdir() if (p / "__init__.py").is_file()}
    return modules | packages


def _paths(names: list[str]) -> list[str]:
    """The names that are paths (a module or a folder), relative to moleflow_edge/."""
    return [n.removeprefix("moleflow_edge/") for n in names if n.endswith((".py", "/"))]


def test_every_path_in_the_readme_layout_exists() -> None:
    paths = _paths(_readme_layout())
    assert len(paths) > 20, paths  # the list was found and parsed
    missing = [p for p in paths if not (PACKAGE / p).exists()]
    assert not missing, f"README's layout names what moleflow_edge/ does not have: {missing}"


def test_every_top_level_module_and_package_is_in_the_readme_layout() -> None:
    listed = {p.split("/")[0] + ("/" if "/" in p else "") for p in _paths(_readme_layout())}
    unlisted = sorted(_top_level() - listed)
    assert not unlisted, f"README's layout does not mention: {unlisted}"


def test_every_top_level_module_and_package_is_in_the_architecture_layout() -> None:
    block = _section((REPO / "docs" / "architecture.md").read_text(), "Package layout")
    unlisted = sorted(n for n in _top_level() if not re.search(rf"(?<![\w/]){re.escape(n)}", block))
    assert not unlisted, f"docs/architecture.md's package layout does not mention: {unlisted}"
