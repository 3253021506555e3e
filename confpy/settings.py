"""How a configuration key is declared: once, as a field of its table's frozen dataclass.

`setting(...)` is a dataclass field that also carries everything else about the key: its parser
(which checks the TOML value and says what to fix), its default as written in TOML, the
environment variable that stands for it, whether it is a secret (kept out of reprs) and one line
of documentation. The parsing in config.py, the environment maps, the key tables of
docs/configuration.md and `confpy init`'s example are all derived from these declarations
(config_doc.py), so a key is added in one place.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import MISSING, Field, dataclass, field, fields
from typing import TypeVar, dataclass_transform, overload

T = TypeVar("T")
C = TypeVar("C")

# Checks one TOML value; the label ("FILE: [table] key") starts every error message.
Parser = Callable[[object, str], T]

_METADATA_KEY = "confpy.setting"


class _Required:
    """The default of a key that has none: the user must write it."""

    def __repr__(self) -> str:
        return "REQUIRED"


REQUIRED = _Required()


@dataclass(frozen=True)
class Declaration:
    """What one `setting(...)` says about its key, beside the dataclass field itself."""

    doc: str
    parse: Parser[object] | None  # None: a nested table (`nested`), checked by the table that holds it
    toml_default: object  # as written in TOML; None: unset; REQUIRED: none at all
    env: str = ""
    env_parse: Callable[[str, str], object] | None = None  # (raw, "$VARIABLE") -> value; None: the raw text
    doc_default: str = ""  # the default column's text when it is not the TOML default (computed defaults)
    example: object = None  # what `confpy init` shows for a key whose default is unset
    secret: bool = False
    nested: type | None = None


@overload
def setting(
    *,
    parse: Parser[T],
    doc: str,
    default: object = ...,
    env: str = "",
    env_parse: Callable[[str, str], T] | None = None,
    doc_default: str = "",
    example: object = None,
    secret: bool = False,
) -> T: ...


@overload
def setting(*, nested: type[T], doc: str, default: None, doc_default: str = "") -> T | None: ...


def setting(
    *,
    doc: str,
    parse: Parser[T] | None = None,
    nested: type[T] | None = None,
    default: object = REQUIRED,
    env: str = "",
    env_parse: Callable[[str, str], T] | None = None,
    doc_default: str = "",
    example: object = None,
    secret: bool = False,
) -> object:
    """Declare one configuration key (a field specifier for `config_table`).

    `default` is written as in the TOML file (`"60s"`, `"nginx -t"`, `["nginx"]`) and parsed with
    `parse` into the field's default, so the documented default and the real one cannot differ.
    Omitted, the key is required; None, the field defaults to None (unset).
    """
    declaration = Declaration(
        doc=doc,
        parse=parse,
        toml_default=default,
        env=env,
        env_parse=env_parse,
        doc_default=doc_default,
        example=example,
        secret=secret,
        nested=nested,
    )
    metadata = {_METADATA_KEY: declaration}
    if default is REQUIRED:
        return field(repr=not secret, metadata=metadata)
    value = default if default is None or parse is None else parse(default, "the declared default")
    return field(default=value, repr=not secret, metadata=metadata)


@dataclass_transform(frozen_default=True, field_specifiers=(setting,))
def config_table(cls: type[C]) -> type[C]:
    """A frozen dataclass whose fields are declared with `setting(...)`: one TOML table."""
    return dataclass(frozen=True)(cls)


@dataclass(frozen=True)
class Setting:
    """One key of one table, as declared: the view the parser and the generators read."""

    table: str
    key: str
    declaration: Declaration
    default: object  # the field's Python default; REQUIRED when it has none

    @property
    def doc(self) -> str:
        return self.declaration.doc

    @property
    def env(self) -> str:
        return self.declaration.env

    @property
    def toml_default(self) -> object:
        return self.declaration.toml_default

    def parse(self, value: object, label: str) -> object:
        """The key's checked value; a nested table is passed through for its holder to check."""
        parse = self.declaration.parse
        return value if parse is None else parse(value, label)

    def from_env(self, raw: str) -> object:
        """The value of the key's environment variable; errors are labelled with the variable."""
        env_parse = self.declaration.env_parse
        return raw if env_parse is None else env_parse(raw, f"${self.env}")


def _declared(item: Field[object]) -> Declaration:
    declaration = item.metadata.get(_METADATA_KEY)
    if not isinstance(declaration, Declaration):
        raise TypeError(f"configuration field {item.name!r} is not declared with setting(...)")
    return declaration


def settings_of(table: str, cls: type) -> tuple[Setting, ...]:
    """The keys of `cls` (a `config_table`), in declaration order."""
    return tuple(
        Setting(table, item.name, _declared(item), REQUIRED if item.default is MISSING else item.default)
        for item in fields(cls)
    )


def all_settings(tables: Mapping[str, type]) -> dict[str, tuple[Setting, ...]]:
    """Every table's keys, by table name."""
    return {table: settings_of(table, cls) for table, cls in tables.items()}


def environment_map(settings: tuple[Setting, ...]) -> dict[str, str]:
    """The environment variable of each key that has one, by key."""
    return {item.key: item.env for item in settings if item.env}
