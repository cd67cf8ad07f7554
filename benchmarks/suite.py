"""What a benchmark suite declares about itself, and how ``run.py`` finds the suites.

Each ``benchmarks/bench_<name>.py`` holds pytest-benchmark tests and one ``SUITE = Suite(...)``:
its name (``python benchmarks/run.py --suite <name>``), the ``op`` values of the rows it writes
(a run of one suite replaces exactly those rows in the device's results file), the figures it
derives from its own rows (``rows``: in place, e.g. time over a baseline measured in the same run),
and the lines it prints (``table``). ``run.py`` imports every ``bench_*.py`` and knows no suite by
name.
"""

from __future__ import annotations

import glob
import importlib
import os
from collections.abc import Callable
from dataclasses import dataclass, field

HERE = os.path.dirname(os.path.abspath(__file__))


def _nothing(rows: list[dict]) -> None:
    return None


def _no_lines(rows: list[dict]) -> list[str]:
    return []


@dataclass(frozen=True)
class Suite:
    name: str
    ops: frozenset[str]
    rows: Callable[[list[dict]], None] = field(default=_nothing)  # derived figures, in place
    table: Callable[[list[dict]], list[str]] = field(default=_no_lines)  # printed after a run
    file: str = ""  # set by discover()


def discover() -> dict[str, Suite]:
    """Every suite in ``benchmarks/bench_*.py``, by name, in file order."""
    found: dict[str, Suite] = {}
    for path in sorted(glob.glob(os.path.join(HERE, "bench_*.py"))):
        module = importlib.import_module(os.path.basename(path)[:-3])
        suite = getattr(module, "SUITE", None)
        if not isinstance(suite, Suite):
            raise RuntimeError(f"{os.path.relpath(path, os.path.dirname(HERE))} declares no SUITE = Suite(...)")
        if suite.name in found:
            raise RuntimeError(f"two suites are named {suite.name!r}")
        clash = [s.name for s in found.values() if s.ops & suite.ops]
        if clash:
            raise RuntimeError(f"suites {suite.name!r} and {clash[0]!r} both write rows of op {sorted(suite.ops)}")
        found[suite.name] = Suite(suite.name, frozenset(suite.ops), suite.rows, suite.table, os.path.basename(path))
    return found


def fmt(x, spec: str = ".2f") -> str:
    """A number for a table, or nan where the figure is missing."""
    return format(float("nan") if x is None else x, spec)
