"""Does the built wheel install from wheels alone everywhere CPython runs? (issue 18)

No machine here runs Alpine, Windows or a free-threaded CPython, so the resolver is the
judge: for each platform and Python version of the matrix, resolve
``koala-middleware[flask,fastapi,django]`` (the package and every framework extra) with
source builds forbidden. Any row that cannot resolve fails the script (exit status 1).
``[curl]`` (the optional libcurl engine) is resolved too, for information only: pycurl has
no wheels for musllinux, manylinux2014 or free-threaded CPython, and nothing requires it.

Usage (needs PyPI)::

    python scripts/platforms.py                # builds the wheel from this checkout
    python scripts/platforms.py --wheel dist/koala_middleware-0.1.0-py3-none-any.whl

Regular CPython rows use ``uv pip compile --python-platform`` (well under a second each
once its cache is warm); uv cannot target the free-threaded ABI (``3.13t`` is not a
version to it), so those rows use ``pip install --dry-run --only-binary=:all: --platform
... --abi cp313t``, a few at a time. The whole matrix takes about two minutes.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
EXTRAS = "flask,fastapi,django"
#: (uv's --python-platform, pip's --platform, label)
PLATFORMS = [
    ("x86_64-manylinux2014", "manylinux2014_x86_64", "manylinux2014 x86_64 (Amazon Linux 2, Lambda)"),
    ("aarch64-manylinux2014", "manylinux2014_aarch64", "manylinux2014 aarch64"),
    ("x86_64-manylinux_2_28", "manylinux_2_28_x86_64", "manylinux_2_28 x86_64"),
    ("aarch64-manylinux_2_28", "manylinux_2_28_aarch64", "manylinux_2_28 aarch64"),
    ("x86_64-unknown-linux-musl", "musllinux_1_2_x86_64", "musllinux x86_64 (Alpine)"),
    ("aarch64-unknown-linux-musl", "musllinux_1_2_aarch64", "musllinux aarch64 (Alpine)"),
    ("aarch64-apple-darwin", "macosx_11_0_arm64", "macOS arm64"),
    ("x86_64-apple-darwin", "macosx_10_13_x86_64", "macOS x86_64"),
    ("x86_64-pc-windows-msvc", "win_amd64", "Windows x86_64"),
]
VERSIONS = ["3.10", "3.11", "3.12", "3.13", "3.14"]
#: Free-threaded rows go through pip (~45 s of resolving each on the 2-core machine), so one
#: version on one platform of each OS family: where wheels are missing, they are missing
#: for the whole family.
FREE_THREADED = ["3.13"]
#: Resolutions at once: each mostly waits on the index, so many run side by side (the
#: pip ones, ~20 s of CPU each, are few).
WORKERS = 16
FREE_THREADED_PLATFORMS = {"manylinux2014_x86_64", "musllinux_1_2_x86_64", "macosx_11_0_arm64", "win_amd64"}


def build_wheel(out: Path) -> Path:
    subprocess.run(
        [sys.executable, "-m", "build", "--wheel", "--outdir", str(out), str(ROOT)], check=True, capture_output=True
    )
    return next(out.glob("koala_middleware-*.whl"))


def uv_row(uv: str, wheel: Path, platform: str, version: str, extras: str) -> tuple[bool, str]:
    requirement = f"koala-middleware[{extras}] @ {wheel.as_uri()}\n"
    done = subprocess.run(
        [
            uv,
            "pip",
            "compile",
            "-",
            # This interpreter only runs the resolver; without --python, uv goes looking for
            # (and tries to download) a CPython of the target version: seconds per row.
            "--python",
            sys.executable,
            "--no-python-downloads",
            "--only-binary",
            ":all:",
            "--python-platform",
            platform,
            "--python-version",
            version,
            "--no-header",
            "--quiet",
        ],
        input=requirement,
        capture_output=True,
        text=True,
    )
    return done.returncode == 0, _why(done)


def pip_row(wheel: Path, platform: str, version: str, extras: str) -> tuple[bool, str]:
    with tempfile.TemporaryDirectory() as target:
        done = subprocess.run(
            [
                sys.executable,
                "-m",
                "pip",
                "install",
                "--dry-run",
                "--quiet",
                "--disable-pip-version-check",
                "--only-binary=:all:",
                "--target",
                target,
                "--platform",
                platform,
                "--python-version",
                version,
                "--implementation",
                "cp",
                "--abi",
                f"cp{version.replace('.', '')}t",
                f"{wheel}[{extras}]",
            ],
            capture_output=True,
            text=True,
        )
    return done.returncode == 0, _why(done)


def _no_free_threaded_pycurl() -> tuple[bool, str]:
    """Not asked (each pip row costs ~45 s): pycurl publishes no free-threaded wheels."""
    return False, "pycurl has no free-threaded wheels"


def _why(done: subprocess.CompletedProcess[str]) -> str:
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    interesting = [line for line in lines if "No matching distribution" in line or "no wheels" in line.lower()]
    return (interesting or lines or [""])[-1].strip()[:160]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--wheel", type=Path, help="the wheel to check (default: build one from this checkout)")
    args = parser.parse_args(argv)
    uv = shutil.which("uv") or str(Path(sys.executable).with_name("uv"))
    with tempfile.TemporaryDirectory() as tmp:
        wheel = args.wheel.resolve() if args.wheel else build_wheel(Path(tmp))
        jobs: list[tuple[str, str, str, Callable[[], tuple[bool, str]]]] = []
        for uv_platform, pip_platform, label in PLATFORMS:
            jobs.extend(
                (label, version, extras, partial(uv_row, uv, wheel, uv_platform, version, extras))
                for version in VERSIONS
                for extras in (EXTRAS, "curl")
            )
            if pip_platform not in FREE_THREADED_PLATFORMS:
                continue
            for version in FREE_THREADED:
                jobs.append((label, version + "t", EXTRAS, partial(pip_row, wheel, pip_platform, version, EXTRAS)))
                jobs.append((label, version + "t", "curl", partial(_no_free_threaded_pycurl)))
        with ThreadPoolExecutor(max_workers=WORKERS) as pool:
            results = list(pool.map(lambda job: job[3](), jobs))
    print(f"wheel: {wheel.name}; binary-only resolution (no source builds)")
    print(f"| platform | CPython | [{EXTRAS}] (required) | [curl] (optional) |")
    print("| --- | --- | --- | --- |")
    failed = []
    rows: dict[tuple[str, str], dict[str, tuple[bool, str]]] = {}
    for (label, version, extras, _), result in zip(jobs, results, strict=True):
        rows.setdefault((label, version), {})[extras] = result
    for (label, version), found in rows.items():
        ok, why = found[EXTRAS]
        curl_ok, _ = found["curl"]
        print(f"| {label} | {version} | {'yes' if ok else 'NO: ' + why} | {'yes' if curl_ok else 'no wheel'} |")
        if not ok:
            failed.append(f"{label} / CPython {version}")
    if failed:
        print(f"\n{len(failed)} row(s) cannot install from wheels: " + "; ".join(failed))
        return 1
    print(f"\nall {len(rows)} rows resolve from wheels alone")
    return 0


if __name__ == "__main__":
    sys.exit(main())
