"""The module map is kept in two places, README "Code layout" and worker/__init__.py: both
must list the same modules in the same words, and every module of worker/ must be on it."""

import re
import textwrap
from pathlib import Path

import worker

ROOT = Path(__file__).resolve().parents[1]
README_MAP = re.compile(r"`worker/`, one line per module.*?```\n(.*?)```", re.DOTALL)


def _package_map() -> str:
    doc = worker.__doc__ or ""
    block = doc.split("Module map", 1)[1].split("\n\n", 1)[1]
    return textwrap.dedent(block).strip()


def _readme_map() -> str:
    match = README_MAP.search((ROOT / "README.md").read_text())
    assert match is not None, "README has no module map under Code layout"
    return match.group(1).strip()


def test_the_two_module_maps_say_the_same() -> None:
    assert _readme_map() == _package_map()


def test_every_module_is_on_the_map() -> None:
    listed = {line.split()[0] for line in _package_map().splitlines() if not line.startswith(" ")}
    package = Path(worker.__file__).parent
    modules = {p.stem for p in package.glob("*.py") if p.stem != "__init__"}
    packages = {f"{p.name}/" for p in package.iterdir() if (p / "__init__.py").exists()}
    assert modules | packages <= listed
