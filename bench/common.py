"""What every benchmark part shares: the machine's description, statistics, result rows."""

from __future__ import annotations

import dataclasses
import importlib.metadata
import os
import platform
import statistics
import sys
from collections.abc import Sequence

PACKAGES = (
    "koala-middleware",
    "starlette",
    "flask",
    "werkzeug",
    "uvicorn",
    "gunicorn",
    "httpx",
    "h11",
    "aiohttp",
    "posthog",
    "segment-analytics-python",
)


def cpu_model() -> str:
    """The CPU's model name (Linux ``/proc/cpuinfo``; ``platform`` elsewhere)."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as info:
            for line in info:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown CPU"


def cores() -> int:
    """Cores this process may run on (what a container or ``taskset`` allows)."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def versions() -> dict[str, str]:
    found = {}
    for name in PACKAGES:
        try:
            found[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            found[name] = "-"
    return found


def machine_line() -> str:
    """One line for the README: CPU, cores, OS, Python and the versions that matter."""
    python = f"{platform.python_implementation()} {platform.python_version()}"
    packages = ", ".join(f"{name} {version}" for name, version in versions().items())
    return f"{cpu_model()}, {cores()} cores, {platform.system()} {platform.release()}, {python}; {packages}"


def median(values: Sequence[float]) -> float:
    return statistics.median(values) if values else float("nan")


def percentile(sorted_values: Sequence[float], fraction: float) -> float:
    """Nearest-rank percentile of already sorted values (``fraction`` in 0..1)."""
    if not sorted_values:
        return float("nan")
    rank = min(len(sorted_values) - 1, max(0, round(fraction * len(sorted_values)) - 1))
    return sorted_values[rank]


@dataclasses.dataclass
class Row:
    """One line of the results table: what was measured, its ratio, and the target."""

    part: str
    case: str
    measured: str
    ratio: float | None
    target: str
    met: bool | None

    @property
    def verdict(self) -> str:
        return "-" if self.met is None else "yes" if self.met else "**no**"


def check(ratio: float, limit: float, at_most: bool = True) -> bool:
    return ratio <= limit if at_most else ratio >= limit


def markdown(rows: Sequence[Row]) -> str:
    lines = [
        "| part | case | measured | ratio | target | met |",
        "| --- | --- | --- | ---: | --- | --- |",
    ]
    for row in rows:
        ratio = "" if row.ratio is None else f"{row.ratio:.2f}x"
        lines.append(f"| {row.part} | {row.case} | {row.measured} | {ratio} | {row.target} | {row.verdict} |")
    return "\n".join(lines)


def say(message: str) -> None:
    """Progress goes to stderr, so stdout is only the table."""
    print(message, file=sys.stderr, flush=True)
