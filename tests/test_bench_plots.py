"""scripts/bench_plots.py reads the table ``bench/run.py`` prints and draws the docs' plots."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
RUN = ROOT / "docs" / "assets" / "bench" / "run.txt"


def _plots() -> object:
    spec = importlib.util.spec_from_file_location("bench_plots", ROOT / "scripts" / "bench_plots.py")
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def test_reads_the_committed_bench_run() -> None:
    rows = _plots().read_rows(RUN.read_text())  # type: ignore[attr-defined]
    parts = {row.part for row in rows}
    assert {"1a", "1b", "1c", "5"} <= parts
    koala = [r for r in rows if r.case == "Starlette, returning visitor: koala"]
    assert len(koala) == 1 and koala[0].ratio and koala[0].ratio > 1.0


def test_reads_the_earlier_versions_a_part_1_row_carries() -> None:
    plots = _plots()
    rows = plots.read_rows(RUN.read_text())  # type: ignore[attr-defined]
    starlette = next(r for r in rows if r.case == "Starlette, returning visitor: koala")
    assert set(plots.earlier_versions(starlette.measured)) == {"first round", "before", "passes 1-2"}  # type: ignore[attr-defined]
    assert plots.earlier_versions("9.4 us/request (+2.0 us) (before 1.10x; passes 1-2 1.09x)") == {  # type: ignore[attr-defined]
        "before": 1.10,
        "passes 1-2": 1.09,
    }


def test_draws_both_plots(tmp_path: Path) -> None:
    pytest.importorskip("matplotlib", reason="the docs extra draws the plots")
    run = tmp_path / "run.txt"
    run.write_text(RUN.read_text())
    assert _plots().main([str(run)]) == 0  # type: ignore[attr-defined]
    for name in ("inproc.svg", "sdks.svg"):
        assert (tmp_path / name).read_text().lstrip().startswith("<?xml")
