"""What is generated from the configuration keys' declarations (config.py): the key and
environment tables of docs/configuration.md, and the commented example `confpy init` prints.

`python -m confpy.config_doc` rewrites the generated blocks of docs/configuration.md in place;
`--check` only says whether they are current (tests/test_config.py asserts they are).
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import textwrap
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from confpy.config import SETTINGS, TABLES
from confpy.settings import REQUIRED, Setting, settings_of

DOC_PATH = Path(__file__).resolve().parent.parent / "docs" / "configuration.md"
_COMMAND = "python -m confpy.config_doc"
# <!-- keys of [consul]: generated ... --> ... <!-- end of generated keys -->
_BLOCK = re.compile(
    r"(?P<open><!-- (?P<kind>keys|environment) of \[(?P<table>\w+)\]: [^>]*-->\n)(?P<body>.*?)"
    r"(?P<close><!-- end of generated (?P=kind) -->)",
    re.DOTALL,
)


def toml_value(value: object) -> str:
    """`value` (a TOML default as declared) written as TOML."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value)
    if isinstance(value, list | tuple):
        return "[" + ", ".join(toml_value(item) for item in value) + "]"
    if isinstance(value, Mapping):
        return "{ " + ", ".join(f"{key} = {toml_value(item)}" for key, item in value.items()) + " }"
    raise TypeError(f"no TOML form for {value!r}")


def _example_value(item: Setting) -> object:
    """What a commented-out line shows: the TOML default, else the declared example, else (a
    nested table) the nested table's own defaults."""
    declaration = item.declaration
    if declaration.nested is not None:
        return {sub.key: sub.toml_default for sub in settings_of(item.key, declaration.nested)}
    if item.toml_default is None:
        return declaration.example
    return item.toml_default


def default_text(item: Setting) -> str:
    """The default column of the key table."""
    declared = item.declaration.doc_default
    if declared:
        return declared
    if item.toml_default is REQUIRED:
        return "required"
    value = item.toml_default
    written = "none" if value in (None, "", []) else f"`{toml_value(value)}`"
    return f"`${item.env}`, else {written}" if item.env else written


def key_table(table: str) -> str:
    """The markdown table of `table`'s keys: key, default, meaning."""
    rows = ["| key | default | meaning |", "| --- | --- | --- |"]
    rows += [f"| `{item.key}` | {default_text(item)} | {item.doc} |" for item in SETTINGS[table]]
    return "\n".join(rows) + "\n"


def environment_table(table: str) -> str:
    """The markdown table of the environment variables that stand for `table`'s keys."""
    rows = ["| variable | key |", "| --- | --- |"]
    rows += [f"| `{item.env}` | `{item.key}` |" for item in SETTINGS[table] if item.env]
    return "\n".join(rows) + "\n"


def render_doc(text: str) -> str:
    """`text` (docs/configuration.md) with every generated block written anew from the declarations.
    ValueError when a table has no key block or a block names an unknown table."""
    seen: set[str] = set()

    def fill(match: re.Match[str]) -> str:
        kind, table = match["kind"], match["table"]
        if table not in TABLES:
            raise ValueError(f"a generated block names the unknown table [{table}]")
        if kind == "keys":
            seen.add(table)
        body = key_table(table) if kind == "keys" else environment_table(table)
        return match["open"] + body + match["close"]

    rendered = _BLOCK.sub(fill, text)
    missing = [table for table in TABLES if table not in seen]
    if missing:
        raise ValueError(f"no generated key table for {', '.join(f'[{t}]' for t in missing)}")
    return rendered


def block_marker(kind: str, table: str) -> str:
    """The comment that opens a generated block (what to write in the doc to add one)."""
    return f"<!-- {kind} of [{table}]: generated from confpy/config.py by `{_COMMAND}`; edit there -->"


# --- `confpy init` -------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Example:
    """One example configuration: what it sets beyond the defaults, and notes for the reader."""

    header: tuple[str, ...]
    values: Mapping[tuple[str, str], object]
    notes: Mapping[tuple[str, str], str] = field(default_factory=dict)


_HEADER = (
    "confpy's example configuration (`confpy init` prints it; docs/configuration.md has every key).",
    "Copy it to /etc/confpy/confpy.toml and adjust it. Every key is here, under its meaning: one",
    "commented out (#key = ...) shows its default, which an environment variable named in its",
    "comment may fill instead.",
)
_TEMPLATE_NOTES = {
    ("template", "destination"): "Debian's nginx includes conf.d/*.conf inside http {}: "
    "proxy_pass http://SERVICE; then just works.",
}
_RELOAD_EXAMPLE = _Example(
    header=_HEADER,
    values={
        ("nginx", "check_cmd"): "nginx -t -q",
        ("status", "listen"): "127.0.0.1:9118",
        ("template", "source"): "builtin:nginx-upstreams.conf.j2",
        ("template", "destination"): "/etc/nginx/conf.d/upstreams.conf",
    },
    notes=_TEMPLATE_NOTES,
)
_LIVE_EXAMPLE = _Example(
    header=(
        "confpy's example configuration for live mode (`confpy init --live`; docs/live-mode.md).",
        "nginx needs the Lua module: apt-get install libnginx-mod-http-lua lua-resty-core lua-cjson",
        *_HEADER[1:],
    ),
    values={
        **_RELOAD_EXAMPLE.values,
        ("nginx", "mode"): "live",
        ("template", "source"): "builtin:nginx-upstreams-live.conf.j2",
    },
    notes={
        **_TEMPLATE_NOTES,
        ("nginx", "mode"): "The admin API nginx serves for confpy: by default a Unix socket in /run/confpy (root "
        "only), with a token confpy creates in /var/lib/confpy/admin.token (see docs/security.md).",
    },
)
# A table written only as a comment: uncommenting its header changes what confpy follows.
_COMMENTED_TABLES = {
    "etcd": "Instead of [consul], to follow etcd (docs/etcd.md): uncomment this table, delete [consul]."
}


def _comment(text: str, prefix: str = "# ") -> list[str]:
    return textwrap.wrap(text, width=100, initial_indent=prefix, subsequent_indent=prefix, break_on_hyphens=False)


def example_config(live: bool = False) -> str:
    """The example configuration `confpy init` prints: every key of every table, with its doc line;
    those the example sets are written, the others commented out with their defaults."""
    example = _LIVE_EXAMPLE if live else _RELOAD_EXAMPLE
    lines = [line for text in example.header for line in _comment(text)]
    for table in TABLES:
        commented = table in _COMMENTED_TABLES
        lines.append("")
        if commented:
            lines += _comment(_COMMENTED_TABLES[table])
        header = f"[[{table}]]" if table == "template" else f"[{table}]"
        lines.append(f"#{header}" if commented else header)
        for item in SETTINGS[table]:
            lines.append("")
            doc = item.doc
            if item.declaration.doc_default:
                doc += f" (default: {item.declaration.doc_default})"
            lines += _comment(doc)
            if (table, item.key) in example.notes:
                lines += _comment(example.notes[table, item.key])
            if (table, item.key) in example.values and not commented:
                lines.append(f"{item.key} = {toml_value(example.values[table, item.key])}")
            elif item.toml_default is REQUIRED:
                raise ValueError(f"the example sets no value for the required key [{table}] {item.key}")
            else:
                lines.append(f"#{item.key} = {toml_value(_example_value(item))}")
    return "\n".join(lines) + "\n"


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog=_COMMAND, description="Write docs/configuration.md's key tables from the declarations in config.py."
    )
    parser.add_argument("doc", nargs="?", type=Path, default=DOC_PATH, help="the file (default: %(default)s)")
    parser.add_argument("--check", action="store_true", help="change nothing; exit 1 when the file is not current")
    args = parser.parse_args(argv)
    text = args.doc.read_text(encoding="utf-8")
    rendered = render_doc(text)
    if rendered == text:
        return 0
    if args.check:
        print(f"{args.doc}: the generated tables are out of date; run {_COMMAND}", file=sys.stderr)
        return 1
    args.doc.write_text(rendered, encoding="utf-8")
    print(f"{args.doc}: generated tables rewritten")
    return 0


if __name__ == "__main__":
    sys.exit(main())
