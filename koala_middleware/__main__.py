"""``python -m koala_middleware check`` (also the ``koala-middleware`` command).

::

    $ koala-middleware check                 # KOALA_PUBLIC_KEY / KOALA_API_URL, as the client reads them
    $ koala-middleware check --key pk_... --api-url https://api2.getkoala.com [--proxy http://proxy:3128]
    $ koala-middleware check --pixel-url https://app.example.com/_k   # the first-party pixel (docs/pixel.md)

Exit status: 0 the key works, 1 no key or Koala rejected it, 2 Koala could not be asked.
"""

from __future__ import annotations

import argparse
import os
import sys

from ._check import check


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="koala-middleware", description="Tools for koala-middleware.")
    commands = parser.add_subparsers(dest="command", required=True, metavar="command")
    checker = commands.add_parser(
        "check",
        help="check that Koala accepts your public key, asked from this machine",
        description="Check the public key with Koala (GET {api_url}/web/projects/{key}/auth) and say what "
        "was found. Exit status: 0 the key works, 1 no key or rejected, 2 Koala could not be asked.",
    )
    checker.add_argument("--key", help="the public key (default: KOALA_PUBLIC_KEY)")
    checker.add_argument("--api-url", help="Koala's API (default: KOALA_API_URL, else https://api2.getkoala.com)")
    checker.add_argument(
        "--proxy", help="an http:// or https:// proxy (default: HTTPS_PROXY and the like, as the client)"
    )
    checker.add_argument("--timeout", type=float, default=10.0, help="seconds to wait for Koala (default: 10)")
    checker.add_argument(
        "--pixel-url",
        help="instead: check the first-party pixel at this URL (your app's URL and pixel_path, "
        "e.g. https://app.example.com/_k): sdk.js answers JavaScript, the API answers JSON",
    )
    args = parser.parse_args(argv)
    if args.pixel_url:
        from ._pixel import require_extra

        require_extra("httpx")
        from ._pixel._check import check_pixel

        return check_pixel(args.pixel_url, args.key or os.environ.get("KOALA_PUBLIC_KEY"), args.timeout, sys.stdout)
    return check(args.key, args.api_url, args.proxy, args.timeout, sys.stdout)


if __name__ == "__main__":
    sys.exit(main())
