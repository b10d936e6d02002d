#!/usr/bin/env python3
"""Draw the documentation's performance plots from a bench run's output.

    python3 scripts/dev.py bench --only inproc --only sdks > docs/assets/bench/run.txt
    python scripts/bench_plots.py docs/assets/bench/run.txt   # writes docs/assets/bench/*.svg

Reads the Markdown table ``bench/run.py`` prints (one row per case, with its ratio) and
writes SVG bar charts next to it: ``inproc.svg`` (part 1: the middleware's cost per request
as a ratio to the same app without it, beside the earlier versions the same run timed,
Starlette's SessionMiddleware as a yardstick) and
``sdks.svg`` (part 5: CPU per visitor against PostHog's and Segment's SDKs). Needs
matplotlib (the ``docs`` extra). The SVGs are committed, so building the site needs no run.
"""

from __future__ import annotations

import re
import sys
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Row:
    part: str
    case: str
    measured: str
    ratio: float | None


def read_rows(text: str) -> list[Row]:
    rows = []
    for line in text.splitlines():
        cells = [cell.strip() for cell in line.strip().strip("|").split("|")]
        if len(cells) < 4 or not re.fullmatch(r"\d+[a-z]?", cells[0]):
            continue
        ratio = float(cells[3].rstrip("x")) if cells[3].endswith("x") else None
        rows.append(Row(cells[0], cells[1], cells[2], ratio))
    return rows


def _number(measured: str) -> float:
    return float(measured.split()[0].replace(",", ""))


_VERSIONS = ("first round", "before", "passes 1-2")  # as bench/inproc.py names them in a row
_VERSION_COLOURS = {"first round": "#c8e6c9", "before": "#81c784", "passes 1-2": "#43a047", "now": "#1b5e20"}
_VERSION_LABELS = {  # for a reader of the docs, who knows no "pass"
    "first round": "first version (2026-11-23)",
    "before": "this round's start",
    "passes 1-2": "this round, passes 1-2",
    "now": "this version",
}


def earlier_versions(measured: str) -> dict[str, float]:
    """The earlier versions' ratios a part 1 row carries: "(first round 1.21x; before 1.30x; ...)"."""
    return {name: float(ratio) for name, ratio in re.findall(r"(first round|before|passes 1-2) (\d+\.\d+)x", measured)}


def plot_inproc(rows: list[Row], machine: str, out: Path) -> None:
    """Part 1: each case's ratio to the bare app, this tree beside the earlier versions timed in the same run."""
    import matplotlib.pyplot as plt

    wanted = [r for r in rows if r.part.startswith("1") and r.ratio is not None and not r.case.endswith(": bare")]
    if not wanted:
        return
    labels = [r.case.replace(": koala", "").replace(": ", "\n") for r in wanted]
    fig, ax = plt.subplots(figsize=(9, 0.62 * len(wanted) + 1.6))
    height = 0.8 / (len(_VERSIONS) + 1)
    for i, r in enumerate(wanted):
        if "SessionMiddleware" in r.case or "floor" in r.case:  # yardsticks: one bar, this run only
            ax.barh(i, r.ratio or 0, height * 1.5, color="#9e9e9e" if "floor" not in r.case else "#bdbdbd")
            ax.text((r.ratio or 0) + 0.03, i, f"{r.ratio:.2f}x", va="center", fontsize=7)
            continue
        versions = {**earlier_versions(r.measured), "now": r.ratio or 0}
        for j, name in enumerate((*_VERSIONS, "now")):
            if name not in versions:
                continue
            y = i + (j - len(_VERSIONS) / 2) * height
            ax.barh(
                y, versions[name], height, color=_VERSION_COLOURS[name], label=_VERSION_LABELS[name] if i == 0 else None
            )
            ax.text(versions[name] + 0.03, y, f"{versions[name]:.2f}x", va="center", fontsize=6)
    ax.set_yticks(range(len(wanted)), labels, fontsize=7)
    ax.invert_yaxis()
    ax.axvline(1.0, color="black", linewidth=0.8)
    ax.set_xlabel("CPU per request, as a ratio to the same app without the middleware (1.00x); lower is better")
    ax.set_title(
        "In-process cost per request (part 1): this version beside earlier ones, same run\n"
        "(grey: Starlette's SessionMiddleware, and the floor: koala's duties and nothing else)",
        fontsize=10,
    )
    ax.set_xlim(0, max(r.ratio or 0 for r in wanted) * 1.2)
    ax.legend(fontsize=7, loc="lower right", title="version", title_fontsize=7)
    fig.text(0.01, 0.005, machine, fontsize=6, color="#555555")
    fig.tight_layout(rect=(0, 0.03, 1, 1))
    fig.savefig(out, format=out.suffix[1:], metadata={"Date": None} if out.suffix == ".svg" else None)
    plt.close(fig)


def plot_sdks(rows: list[Row], machine: str, out: Path) -> None:
    import matplotlib.pyplot as plt

    wanted = [r for r in rows if r.part == "5"]
    if not wanted:
        return
    groups = sorted({r.case.split(":")[0] for r in wanted}, key=lambda g: "only" in g)
    sdks = list(dict.fromkeys(r.case.split(": ", 1)[1] for r in wanted))
    fig, ax = plt.subplots(figsize=(9, 3.6))
    width = 0.8 / len(sdks)

    def colour(sdk: str) -> str:  # ours in greens (the noise control pale), the peers apart
        if "noise control" in sdk:
            return "#a5d6a7"
        if "curl" in sdk:
            return "#1b5e20"
        return "#43a047" if "koala" in sdk else "#1565c0" if "PostHog" in sdk else "#ef6c00"

    for j, sdk in enumerate(sdks):
        values = []
        for group in groups:
            match = [r for r in wanted if r.case == f"{group}: {sdk}"]
            values.append(_number(match[0].measured) if match else 0.0)
        xs = [i + (j - (len(sdks) - 1) / 2) * width for i in range(len(groups))]
        bars = ax.bar(xs, values, width, label=sdk, color=colour(sdk))
        ax.bar_label(bars, [f"{v:.0f} us" for v in values], fontsize=7)
    ax.set_xticks(range(len(groups)), groups, fontsize=8)
    ax.set_ylabel("whole-process CPU per visitor (us)")
    ax.set_title("One identify + one track per visitor (part 5; lower is better)", fontsize=10)
    ax.set_ylim(0, max(_number(r.measured) for r in wanted) * 1.15)
    ax.legend(fontsize=7, loc="upper right")
    fig.text(0.01, 0.005, machine, fontsize=6, color="#555555")
    fig.tight_layout(rect=(0, 0.04, 1, 1))
    fig.savefig(out, format=out.suffix[1:], metadata={"Date": None} if out.suffix == ".svg" else None)
    plt.close(fig)


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        print(__doc__)
        return 2
    source = Path(argv[0])
    text = source.read_text()
    machine = next((line for line in text.splitlines() if line.startswith("Machine:")), "")[:150]
    rows = read_rows(text)
    if not rows:
        print(f"{source}: no bench table found", file=sys.stderr)
        return 1
    import matplotlib

    matplotlib.use("Agg")
    matplotlib.rcParams["svg.hashsalt"] = "koala-middleware"  # the same run gives the same file
    matplotlib.rcParams["svg.fonttype"] = "none"  # text as text: small, readable diffs
    plot_inproc(rows, machine, source.parent / "inproc.svg")
    plot_sdks(rows, machine, source.parent / "sdks.svg")
    print(f"wrote {source.parent / 'inproc.svg'} and {source.parent / 'sdks.svg'}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
