"""nginx safety and naming: what a template may print unquoted, `| nginx_quote`, the upstream name
of a service, and how `service()` reads the name a template wrote.

Every value a template prints passes `nginx_safe` (the environment's `finalize`), the single choke
point that refuses anything able to break out of an nginx directive, unless the template quoted it
on purpose with `| nginx_quote`.
"""

from __future__ import annotations

import functools
import hashlib
import re
from typing import Any

from confpy.errors import RenderError, UnsafeValueError
from confpy.model import SafeStr
from confpy.registry.base import ServiceHealth

# What may stand unquoted inside an nginx directive: printable ASCII without whitespace, the
# directive terminator, block braces, quotes, comments, variables or escapes.
_UNSAFE_CHAR = re.compile(r"[^\x21-\x7e]|[;{}\"'#$\\]")
_UPSTREAM_NAME = re.compile(r"^[A-Za-z0-9_.-]+$")
_NOT_UPSTREAM_CHARS = re.compile(r"[^A-Za-z0-9_-]+")  # a dot too: a mapped name never looks like a host


def _describe_char(char: str) -> str:
    names = {
        " ": "a space",
        "\t": "a tab",
        "\n": "a newline",
        "\r": "a carriage return",
        ";": "';'",
        "{": "'{'",
        "}": "'}'",
    }
    if char in names:
        return names[char]
    if ord(char) < 0x20 or ord(char) == 0x7F:
        return f"control character U+{ord(char):04X}"
    if ord(char) > 0x7E:
        return f"non-ASCII character U+{ord(char):04X}"
    return repr(char)


def _preview(value: str) -> str:
    return repr(value if len(value) <= 60 else value[:60] + "...")


class NginxQuoted(str):
    """A string already quoted for nginx by `nginx_quote`; finalize lets it through."""


def nginx_quote(value: Any) -> NginxQuoted:
    """Quote a value as one nginx string argument: `"..."` with `\\` and `"` escaped.

    Control characters (newlines included) and `$` (nginx would expand it as a variable) are
    refused: there is no way to write them safely in every directive.
    """
    text = str(value)
    for char in text:
        if ord(char) < 0x20 or ord(char) == 0x7F or char == "$":
            raise UnsafeValueError(
                f"value {_preview(text)} contains {_describe_char(char)}, which nginx_quote cannot write safely", text
            )
    return NginxQuoted('"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"')


def nginx_safe(value: Any) -> Any:
    """Jinja2 `finalize`: let numbers and quoted strings through, refuse unsafe text."""
    kind = type(value)
    if kind is int or kind is SafeStr or kind is NginxQuoted:
        return value  # the common cases first: this runs for every value of every render
    if isinstance(value, bool):
        return "on" if value else "off"
    if isinstance(value, (int, float, NginxQuoted)):
        return value
    if value is None:
        raise UnsafeValueError("a template printed None (an empty value); use a default or an `if`")
    text = value if isinstance(value, str) else str(value)
    bad = _UNSAFE_CHAR.search(text)
    if bad:
        raise UnsafeValueError(
            f"value {_preview(text)} contains {_describe_char(bad.group())}, which could break out of an nginx "
            "directive; it was refused (quote it on purpose with | nginx_quote)",
            text,
        )
    return value


class ServiceName(str):
    """A name as the catalog lists it (`services()`): always the service's literal name, so a
    catalog service whose name contains `@` is never read as `name@dc`."""


def service_dependency(name: Any, tag: Any, dc: Any, passing: Any) -> ServiceHealth:
    """`service(name, tag=None, dc=None, passing=True)`, and consul-template's `name@dc` form for a
    name written in the template (names from `services()` are taken literally).

    Its `tag.name` form is refused rather than guessed: a dot is valid inside a service name.
    """
    if not isinstance(name, str) or not name:
        raise RenderError(f"service() needs a service name (a non-empty string), got {name!r}")
    if tag is not None and not isinstance(tag, str):
        raise RenderError(f"service({name!r}, tag=...) needs a string tag, got {tag!r}")
    if dc is not None and (not isinstance(dc, str) or not dc):
        raise RenderError(f"service({name!r}, dc=...) needs a datacenter name, got {dc!r}")
    if not isinstance(passing, bool):
        raise RenderError(f"service({name!r}, passing=...) needs true or false, got {passing!r}")
    if "@" in name and not isinstance(name, ServiceName):
        base, _, at = name.partition("@")
        if not base or not at or "@" in at or dc is not None:
            raise RenderError(f"service({name!r}): write name@dc once, or dc=..., not both")
        if "." in base:
            raise RenderError(
                f"service({name!r}): consul-template's tag.name@dc form is ambiguous here (a service name may "
                f"contain dots); write service({base.rpartition('.')[2]!r}, tag={base.rpartition('.')[0]!r}, dc={at!r})"
            )
        name, dc = base, at
    return ServiceHealth(str(name), tag, dc, passing)


@functools.lru_cache(maxsize=65536)
def upstream_name_for(service: str, keep_dots: bool = False) -> str:
    """The nginx upstream name for a service (documented in docs/templates.md).

    A name made of letters, digits, `_` and `-` is kept as it is (`web` -> `upstream web`). A name
    with other characters has each run of characters other than those replaced by `_` (dots too)
    and gets `_` plus 8 hex digits of its SHA-1 appended, so two different services never share an
    upstream by accident.

    A name of those characters and dots is refused unless `keep_dots` (the template's
    `dotted_upstreams` lists it): `proxy_pass http://NAME;` picks an `upstream NAME` before DNS, so a service named
    `auth.example.com` or `127.0.0.1` would take the traffic the gateway sends to that host. So is
    `localhost`, a host every resolver knows.
    """
    if "." in service and not keep_dots and _UPSTREAM_NAME.match(service):
        raise UnsafeValueError(
            f"service name {_preview(service)} contains a dot: as an upstream name it would take the traffic the "
            f"gateway sends to host {_preview(service)} (proxy_pass http://NAME; prefers an upstream NAME over DNS); "
            "list it in the template's dotted_upstreams to keep it on purpose"
        )
    if service.lower() == "localhost":
        raise UnsafeValueError(
            "service name 'localhost' would take the traffic the gateway sends to host localhost; rename the service"
        )
    if _UPSTREAM_NAME.match(service):
        return SafeStr(service)
    mapped = _NOT_UPSTREAM_CHARS.sub("_", service).strip("_-")
    if not mapped:
        raise UnsafeValueError(
            f"service name {_preview(service)} maps to no valid nginx upstream name (it needs a letter or digit); rename the service"
        )
    digest = hashlib.sha1(service.encode("utf-8", "surrogatepass"), usedforsecurity=False).hexdigest()[:8]
    return SafeStr(f"{mapped[:100]}_{digest}")


def upstream_key(name: str) -> str:
    """What nginx compares upstream names by: `upstream Q` and `upstream q` are one upstream to it."""
    return name.lower()


def upstream_clash(name: str, first: str, second: str) -> UnsafeValueError:
    """Two services claimed one upstream name (`first` did so first)."""
    return UnsafeValueError(f"services {first!r} and {second!r} both map to upstream {name!r}; rename one of them")
