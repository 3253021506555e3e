"""Quarantine: the upstream nginx refused, found from `nginx -t`'s words and the rendered text, so
one bad registration is left out and every other one still installs.

nginx names the file and line it refuses (`... in /etc/nginx/conf.d/upstreams.conf:12`), or the
upstream it found twice (`duplicate upstream "web" in ...`). The rendered text says which
`upstream NAME { ... }` block holds that line, and the render which service claimed that name.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

from confpy.registry.base import AnyDependency
from confpy.render.naming import upstream_key

# nginx's `[emerg] MESSAGE in FILE:LINE` (the file and line are the last words of the message).
_AT = re.compile(r"\[(?:emerg|crit|alert)\] (?P<message>.*?) in (?P<file>/\S+):(?P<line>\d+)\s*$")
_DUPLICATE = re.compile(r'duplicate upstream "(?P<name>[^"]+)"')
_BLOCK = re.compile(r"upstream\s+(?P<name>[^\s{]+)\s*\{")


@dataclass(frozen=True)
class Quarantined:
    """A service left out because nginx refused its upstream, until its data changes.

    `reads` is the data its block was rendered from (the very objects): a render that finds any
    of them replaced renders the service again. Empty (its block was not a fragment), it stays
    left out until the template is edited or confpy restarts.
    """

    service: str
    upstream: str
    reason: str
    reads: Mapping[AnyDependency, object]
    since: float

    def describe(self) -> str:
        return f"service {self.service!r} (upstream {self.upstream!r}): {self.reason}"


@dataclass(frozen=True)
class Refusal:
    """One of nginx's complaints: its message and where it points."""

    message: str
    file: Path
    line: int


@dataclass(frozen=True)
class Culprit:
    """The service whose upstream nginx refused in `destination`, and nginx's words."""

    destination: Path
    service: str
    upstream: str
    reason: str


def refusals(output: str) -> list[Refusal]:
    """nginx's complaints that name a file and line, in order (from its output, or from a CheckError
    that joined its lines with ` | `)."""
    found = []
    for text in re.split(r"\n| \| ", output):
        match = _AT.search(text)
        if match:
            found.append(Refusal(match["message"], Path(match["file"]), int(match["line"])))
    return found


def upstream_blocks(content: bytes) -> list[tuple[str, int, int]]:
    """Each top-level `upstream NAME { ... }` block of rendered nginx configuration: (NAME, its
    first line, its last line), lines counted from 1."""
    blocks: list[tuple[str, int, int]] = []
    depth = 0
    current: tuple[str, int] | None = None
    for number, raw in enumerate(content.decode("utf-8", "replace").splitlines(), 1):
        text = raw.split("#", 1)[0]  # confpy's values never hold '#' unquoted (nginx_safe refuses it)
        if depth == 0:
            match = _BLOCK.match(text.strip())
            current = (match["name"], number) if match else None
        depth = max(0, depth + text.count("{") - text.count("}"))
        if depth == 0 and current is not None:
            blocks.append((current[0], current[1], number))
            current = None
    return blocks


def upstream_at_line(content: bytes, line: int) -> str | None:
    """The name of the top-level upstream block that holds line `line` of rendered nginx
    configuration; None when the line is outside every upstream block."""
    return next((name for name, first, last in upstream_blocks(content) if first <= line <= last), None)


def installed_holders(content: bytes | None) -> dict[str, str]:
    """The upstreams an installed file defines, as the services that hold them (upstream key ->
    name; a service's upstream is its own name when that needs no mapping): after a restart, a
    service differing only in case from one of them does not take its upstream over."""
    return {upstream_key(name): name for name, _, _ in upstream_blocks(content or b"")}


def _same_file(a: Path, b: Path) -> bool:
    if a == b:
        return True
    try:
        return a.resolve() == b.resolve()
    except OSError:
        return False


def find_culprits(output: str, rendered: Iterable[tuple[Path, bytes, Mapping[str, str]]]) -> list[Culprit]:
    """The services nginx's `output` blames, from each rendered file's (destination, content,
    upstream key -> service). Empty when the failure is not one upstream's (a hand-written file,
    a line outside every upstream block)."""
    files = list(rendered)
    culprits: list[Culprit] = []
    for refusal in refusals(output):
        where = f"{refusal.file}:{refusal.line}"
        duplicate = _DUPLICATE.search(refusal.message)
        for destination, content, upstreams in files:
            if duplicate is not None:
                name = duplicate["name"]
                service = upstreams.get(upstream_key(name))
                if service is not None:
                    reason = f"nginx's configuration already defines an upstream {name!r} (nginx: duplicate upstream at {where})"
                    culprits.append(Culprit(destination, service, name, reason))
                continue
            if not _same_file(refusal.file, destination):
                continue
            upstream = upstream_at_line(content, refusal.line)
            service = upstreams.get(upstream_key(upstream)) if upstream is not None else None
            if upstream is not None and service is not None:
                culprits.append(Culprit(destination, service, upstream, f"nginx -t: {refusal.message} at {where}"))
    return culprits
