"""Reference pages generated at build time, so that they cannot drift from the code.

- `config_reference()`: every recipe key of `baldro.recipes.schema.Recipe` (nested sections flattened to
  dotted keys), its type, its default and the comments beside it in `src/baldro/recipes/schema.py`.
- `cli_reference()`: `baldro --help` and each command's `--help`, from `baldro.cli.build_parser()`.
- `api_reference()`: a mkdocstrings block for every public name of `baldro` (`baldro._API`, the
  lazily imported names of `baldro.__init__`), pointing at the module that defines it.

`docs/hooks.py` puts their output into the pages that hold the markers `<!-- config-reference -->` and
`<!-- api-reference -->` and `<!-- cli-reference -->`; `tests/test_docs.py` checks that they cover every
field, every name and every command.
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import inspect
import io
import textwrap
import tokenize
from typing import Any, Iterator

CONFIG_MARKER = "<!-- config-reference -->"
API_MARKER = "<!-- api-reference -->"
CLI_MARKER = "<!-- cli-reference -->"


@dataclasses.dataclass
class Key:
    key: str  # dotted, e.g. objective.alternates.n
    type: str  # the annotation as written in schema.py
    default: Any  # the default value (a default_factory called); a dataclass for a nested section
    comment: str  # the comment lines above the field and the comment at the end of its line


def _field_comments(cls: type) -> dict[str, str]:
    """Comments of each field of a dataclass in its source: the `#` lines directly above the field
    (after the previous field) and the `#` comment at the end of the field's line."""
    source = textwrap.dedent(inspect.getsource(cls))
    comments: dict[int, str] = {}  # line number -> comment text
    own_line: set[int] = set()  # lines that hold only a comment
    for tok in tokenize.generate_tokens(io.StringIO(source).readline):
        if tok.type == tokenize.COMMENT:
            comments[tok.start[0]] = tok.string.lstrip("#").strip()
            if not tok.line[: tok.start[1]].strip():
                own_line.add(tok.start[0])
    out: dict[str, str] = {}
    body = ast.parse(source).body[0].body  # the class body
    for node in body:
        if not (isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name)):
            continue
        above: list[str] = []
        line = node.lineno - 1
        while line >= 1 and line in own_line:
            above.insert(0, comments[line])
            line -= 1
        trailing = [comments[n] for n in range(node.lineno, node.end_lineno + 1) if n in comments and n not in own_line]
        out[node.target.id] = " ".join(above + trailing)
    return out


def _default(f: dataclasses.Field) -> Any:
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
        return f.default_factory()  # type: ignore[misc]
    return dataclasses.MISSING


def schema_keys(cls: type | None = None, prefix: str = "") -> Iterator[Key]:
    """Every key of the recipe, depth first in the order of `schema.py`: a nested section gives its own
    row (type: the section's dataclass) followed by its keys."""
    if cls is None:
        from baldro.recipes.schema import Recipe

        cls = Recipe
    comments = _field_comments(cls)
    for f in dataclasses.fields(cls):
        key = prefix + f.name
        default = _default(f)
        yield Key(key, str(f.type), default, comments.get(f.name, ""))
        if dataclasses.is_dataclass(default):
            yield from schema_keys(type(default), key + ".")


def _section_doc(cls: type) -> str:
    doc = cls.__doc__ or ""
    # dataclasses give an undocumented class a docstring of its signature: skip it
    return "" if doc.startswith(cls.__name__ + "(") else " ".join(inspect.cleandoc(doc).split())


def _yaml(value: Any) -> str:
    """A default as a recipe would write it (YAML flow style)."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return (
            repr(value) if (value == "" or any(c in value for c in "\n{}:#[]'\"") or value.strip() != value) else value
        )
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k}: {_yaml(v)}" for k, v in value.items()) + "}"
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_yaml(v) for v in value) + "]"
    return repr(value)


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def _prose(text: str) -> str:
    """A comment as a table cell: code spans kept, markup characters outside them shown as they are."""
    parts = text.split("`")
    for i in range(0, len(parts), 2):  # outside code spans
        parts[i] = (
            parts[i]
            .replace("\\", "\\\\")
            .replace("*", "\\*")
            .replace("_", "\\_")
            .replace("<", "&lt;")
            .replace(">", "&gt;")
        )
    return _cell("`".join(parts))


def _code(text: str) -> str:
    """`text` as a table cell's code span (backticks inside widen the fence)."""
    fence = "``" if "`" in text else "`"
    pad = " " if text.startswith("`") or text.endswith("`") else ""
    return f"{fence}{pad}{_cell(text)}{pad}{fence}"


def config_reference() -> str:
    """The configuration reference: one table per section, every key with its type, default and comment."""
    from baldro.recipes.schema import Recipe

    sections: list[tuple[str, type, str, list[Key]]] = [("", Recipe, "", [])]
    for k in schema_keys():
        if dataclasses.is_dataclass(k.default):
            sections.append((k.key, type(k.default), k.comment, []))
            continue
        parent = k.key.rpartition(".")[0]
        next(s for s in reversed(sections) if s[0] == parent)[3].append(k)
    out: list[str] = []
    for name, cls, comment, keys in sections:
        out.append(f"## `{name}`" if name else "## Top level")
        out.append("")
        for text in (comment, _section_doc(cls)):  # the comment beside the section's field, its docstring
            if text:
                out += [_prose(text), ""]
        if not keys:
            out += ["(Only the sections below.)", ""]
            continue
        out += ["| Key | Type | Default | Description |", "| --- | --- | --- | --- |"]
        for k in keys:
            out.append(f"| {_code(k.key)} | {_code(k.type)} | {_code(_yaml(k.default))} | {_prose(k.comment)} |")
        out.append("")
    return "\n".join(out)


def api_names() -> dict[str, str]:
    """Each public name of `baldro` and the module that defines it."""
    import baldro

    return dict(baldro._API)


def api_reference() -> str:
    """mkdocstrings blocks for every public name, grouped by the module that defines it."""
    by_module: dict[str, list[str]] = {}
    for name, module in api_names().items():
        by_module.setdefault(module, []).append(name)
    out: list[str] = []
    for module, names in by_module.items():
        out += [f"## `{module}`", ""]
        for name in names:
            out += [f"::: {module}.{name}", ""]
    return "\n".join(out)


def cli_commands() -> dict[str, argparse.ArgumentParser]:
    """Each `baldro` command's parser, in the order of `baldro --help`."""

    from baldro.cli import build_parser

    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return {"": parser, **sub.choices}


def cli_reference() -> str:
    """`baldro --help` and every command's help, as the terminal shows them (100 columns)."""
    import os

    old = os.environ.get("COLUMNS")
    os.environ["COLUMNS"] = "100"
    try:
        out: list[str] = []
        for name, parser in cli_commands().items():
            out += [
                f"## `baldro {name}`" if name else "## `baldro`",
                "",
                "```text",
                parser.format_help().rstrip(),
                "```",
                "",
            ]
    finally:
        if old is None:
            del os.environ["COLUMNS"]
        else:
            os.environ["COLUMNS"] = old
    return "\n".join(out)
