"""MkDocs hook (mkdocs.yml ``hooks:``): the option tables of docs/configuration.md and
docs/cookie.md, generated from the code at build time so they cannot drift from it.

``<!-- options: client -->`` becomes the table of :class:`koala_middleware.KoalaClient`'s
keyword arguments, ``<!-- options: visitor -->`` that of the middlewares' visitor options
(``koala_middleware._visit.configure``): name, type and default from the signature, meaning
from the ``:param name:`` lines of the docstring. A parameter with no ``:param`` line fails
the build (``mkdocs build --strict`` runs in CI), so a new option comes with its docs.
"""

from __future__ import annotations

import html
import inspect
import re
from collections.abc import Callable
from typing import Any

from mkdocs.exceptions import PluginError

_PLACEHOLDER = re.compile(r"<!-- options: (\w+) -->")
_PARAM = re.compile(r"^:param (\w+):(.*?)(?=^:param |\Z)", re.M | re.S)
_ROLE = re.compile(r":(?:class|func|meth|attr):`~?([^`]+)`")


def _sources() -> dict[str, Callable[..., Any]]:
    from koala_middleware import KoalaClient
    from koala_middleware._visit import configure

    return {"client": KoalaClient, "visitor": configure}


def _params(func: Callable[..., Any]) -> dict[str, str]:
    doc = inspect.cleandoc(func.__doc__ or "")
    found = {}
    for name, text in _PARAM.findall(doc):
        text = _ROLE.sub(lambda m: f"`{m.group(1).rsplit('.', 1)[-1]}`", " ".join(text.split()))
        found[name] = text.replace("``", "`").replace("|", "\\|")
    return found


def _default(value: Any) -> str:
    if isinstance(value, int) and not isinstance(value, bool) and value >= 1024 * 1024 and value % (1024 * 1024) == 0:
        return f"`{value // (1024 * 1024)} * 1024 * 1024` ({value // (1024 * 1024)} MiB)"
    if isinstance(value, int) and not isinstance(value, bool) and value >= 10_000:
        return f"`{value:_}`"
    return f"`{value!r}`"


def options_table(key: str) -> str:
    func = _sources()[key]
    documented = _params(func)
    rows = ["| option | type | default | meaning |", "| --- | --- | --- | --- |"]
    for name, param in inspect.signature(func).parameters.items():
        if name in ("self", "client") or param.kind in (param.VAR_KEYWORD, param.VAR_POSITIONAL):
            continue
        if name not in documented:
            raise PluginError(
                f"docs: {func.__qualname__}'s parameter {name!r} has no ':param {name}:' in its docstring"
            )
        annotation = (
            param.annotation if isinstance(param.annotation, str) else inspect.formatannotation(param.annotation)
        )
        annotation = html.escape(annotation).replace("|", "&#124;")  # a literal | would split the cell
        rows.append(f"| `{name}` | <code>{annotation}</code> | {_default(param.default)} | {documented[name]} |")
    return "\n".join(rows)


def on_page_markdown(markdown: str, **_: Any) -> str:
    return _PLACEHOLDER.sub(lambda m: options_table(m.group(1)), markdown)
