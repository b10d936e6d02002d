"""MkDocs hook (mkdocs.yml ``hooks:``): the option tables of docs/configuration.md and
docs/cookie.md, and the API reference of docs/api.md, generated from the code at build time
so they cannot drift from it.

``<!-- options: client -->`` becomes the table of :class:`koala_middleware.KoalaClient`'s
keyword arguments, ``<!-- options: visitor -->`` that of the middlewares' visitor options
(``koala_middleware._visit.configure``): name, type and default from the signature, meaning
from the ``:param name:`` lines of the docstring. A parameter with no ``:param`` line fails
the build (``mkdocs build --strict`` runs in CI), so a new option comes with its docs.

``<!-- api: koala_middleware.Tracker track identify -->`` becomes a section per member
named: its signature and its docstring (a member without one fails the build too).
"""

from __future__ import annotations

import html
import inspect
import re
from collections.abc import Callable
from typing import Any

from mkdocs.exceptions import PluginError

_PLACEHOLDER = re.compile(r"<!-- options: (\w+) -->")
_API = re.compile(r"<!-- api: ([\w.]+) ([\w ]+?) -->")
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


def _prose(doc: str) -> str:
    """A docstring as Markdown: reST literals and roles become code, ``:param x:`` a list."""
    doc = _ROLE.sub(lambda m: f"`{m.group(1).rsplit('.', 1)[-1]}`", doc).replace("``", "`")
    return re.sub(r"^:param (\w+):", r"- `\1`:", doc, flags=re.M)


def _signature(func: Callable[..., Any]) -> str:
    """``self`` left out, annotations as written in the source (they are strings here)."""
    shown, star = [], False
    for param in list(inspect.signature(func).parameters.values())[1:]:
        if param.kind is param.KEYWORD_ONLY and not star:
            shown.append("*")
            star = True
        text = param.name if param.annotation is param.empty else f"{param.name}: {param.annotation}"
        if param.default is not param.empty:
            text += f" = {param.default!r}"
        shown.append(text)
    return ", ".join(shown)


def api_section(target: str, members: list[str]) -> str:
    import importlib

    module_name, _, class_name = target.rpartition(".")
    cls = getattr(importlib.import_module(module_name), class_name)
    out = []
    for name in members:
        member = inspect.getattr_static(cls, name)
        func = member.fget if isinstance(member, property) else member
        doc = inspect.getdoc(func)
        if not doc:
            raise PluginError(f"docs: {class_name}.{name} has no docstring")
        if isinstance(member, property):
            title = f"`{class_name}.{name}`"
        else:
            title = f"`{class_name}.{name}({_signature(func)})`"
        out.append(f"### {title} {{ #{class_name.lower()}-{name.replace('_', '-')} }}\n\n{_prose(doc)}\n")
    return "\n".join(out)


def on_page_markdown(markdown: str, **_: Any) -> str:
    markdown = _API.sub(lambda m: api_section(m.group(1), m.group(2).split()), markdown)
    return _PLACEHOLDER.sub(lambda m: options_table(m.group(1)), markdown)
