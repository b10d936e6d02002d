"""``python -m bench.handover`` (bench/README.md, part 1 taken apart) still runs: one round."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_one_round_prints_every_variant() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "bench.handover", "--rounds", "1"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    rows = [line for line in result.stdout.splitlines() if line.startswith("| koala") or line.startswith("| floor")]
    assert len(rows) == 13, result.stdout
