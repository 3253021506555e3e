"""The status page: `GET /` on the status listener, server-rendered from one StatusSnapshot.

Readable with JavaScript off (and in a terminal browser); a small script (`/static/status.js`)
keeps it live: it listens to `/events` (Server-Sent Events: one long request, and the browser
reconnects by itself; a poll would ask every second whether anything changed) and on each event
fetches `/` again and swaps the page's content, so the page never reloads. Everything is served
by confpy under a strict Content-Security-Policy (no inline script or style, nothing from
elsewhere). Every registry value is HTML-escaped (Jinja2 autoescape): names, meta and check
outputs are hostile by default here too.
"""

from __future__ import annotations

import html
import os
import re
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import jinja2
import markupsafe
import psutil

from confpy.apply.nginx import current_workers, nginx_master, process_start_time
from confpy.daemon.snapshot import StatusSnapshot
from confpy.daemon.timeline import TimelineEvent
from confpy.errors import ReloadError, UnsafeValueError
from confpy.model import HealthView, ServiceInstance, format_endpoint
from confpy.registry.view import without_credentials
from confpy.render.naming import upstream_name_for

CSP = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; connect-src 'self'; "
    "base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
)

PAGE = """<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>confpy: {{ state }}</title>
<link rel="stylesheet" href="/static/status.css">
</head>
<body>
<div id="page">
<header id="state" class="{{ state }}">
  <h1>confpy {{ version }}: <span id="verdict">{{ state }}</span></h1>
  <p id="reason">{{ reason }}</p>
  <p class="small">as of {{ now }} &middot; {{ mode }} mode &middot; {{ cycles }} cycles &middot;
    <a href="/status">/status</a> &middot; <a href="/metrics">/metrics</a> &middot; <a href="/health">/health</a></p>
  {% if warning %}<p id="exposed">warning: {{ warning }}</p>{% endif %}
</header>
<main>
<section id="registry" class="{{ registry_kind }}">
  <h2>{{ registry_name }}</h2>
  <p>{{ registry_address }}:
  {% if registry_reachable %}<span class="badge ok">reachable</span>
  {% else %}<span class="badge failing">unreachable since {{ registry_down_since }}</span> {{ registry_error }}{% endif %}</p>
</section>
<section id="nginx">
  <h2>nginx</h2>
  <ul>
    <li>master: {{ master }}</li>
    <li>last reload: {{ last_reload or "none since confpy started" }}</li>
    {% if draining %}<li id="draining">{{ draining }}</li>{% endif %}
    {% if deferred %}<li class="warn" id="deferred">{{ deferred }}</li>{% endif %}
    {% if not_reloaded %}<li class="warn">installed but not reloaded: {{ not_reloaded }}</li>{% endif %}
    {% if check_error %}<li class="error" id="check-error">last check: {{ check_error }}</li>{% endif %}
    {% for held in quarantined %}<li class="error quarantined">quarantined (left out until its data changes): {{ held.describe() }}</li>{% endfor %}
  </ul>
</section>
<section id="upstreams">
  <h2>Upstreams</h2>
  {% for up in upstreams %}
  <article class="upstream" data-upstream="{{ up.upstream }}">
    <h3>{{ up.upstream }} <span class="small">{{ up.label }}</span>
      {% if up.kept %}<span class="badge degraded">kept by on_empty: no passing instance</span>{% endif %}
      {% if up.held %}<span class="badge degraded guard-held">{{ up.held }}</span>{% endif %}
      {% if up.latencies %}{{ sparkline(up.latencies) }}{% endif %}</h3>
    <table>
      <thead><tr><th>member</th><th>weight</th><th>health</th><th>nginx</th><th>node / id</th><th>meta</th></tr></thead>
      <tbody>
      {% if up.members %}{{ up.members }}{% else %}
        <tr><td colspan="6">no instance</td></tr>
      {% endif %}
      {% for r in up.rejected %}
        <tr class="rejected"><td colspan="6"><span class="badge failing">left out</span> {{ r }}</td></tr>
      {% endfor %}
      </tbody>
    </table>
  </article>
  {% else %}
  <p>No upstream yet{% if waiting %}: waiting for {{ registry_name }}'s first answer{% endif %}.</p>
  {% endfor %}
</section>
<section id="templates">
  <h2>Templates</h2>
  <table>
    <thead><tr><th>destination</th><th>last render</th><th>last reload</th><th>last error</th></tr></thead>
    <tbody>
    {% for t in templates %}
      <tr><td>{{ t.destination }}</td><td>{{ t.last_render }}</td><td>{{ t.last_reload }}</td><td>{{ t.last_error }}</td></tr>
    {% endfor %}
    </tbody>
  </table>
</section>
<section id="timeline">
  <h2>Last {{ events | length }} events</h2>
  <table>
    <thead><tr><th>time</th><th>event</th><th>what</th><th>change to reload</th></tr></thead>
    <tbody>
    {% for e in events %}
      <tr class="event {{ e.kind }}{% if e.kind.endswith('_down') %} down{% endif %}"><td>{{ e.time }}</td><td>{{ e.kind }}</td><td>{% if e.subject %}{{ e.subject }}: {% endif %}{{ e.text }}</td>
        <td>{% if e.latency is not none %}{{ "%.0f" | format(e.latency * 1000) }} ms{% endif %}</td></tr>
    {% else %}
      <tr><td colspan="4">nothing yet</td></tr>
    {% endfor %}
    </tbody>
  </table>
</section>
</main>
</div>
<script src="/static/status.js"></script>
</body>
</html>
"""

SCRIPT = """\
// confpy's status page: live without reloading the page. Each Server-Sent Event from /events
// means "something changed": fetch the page again and swap its content in place.
(function () {
  "use strict";
  var busy = false, again = false;
  function refresh() {
    if (busy) { again = true; return; }
    busy = true;
    fetch("/", { cache: "no-store" }).then(function (response) {
      return response.text();
    }).then(function (html) {
      var fresh = new DOMParser().parseFromString(html, "text/html");
      var page = fresh.getElementById("page"), current = document.getElementById("page");
      if (page && current) { current.replaceWith(page); document.title = fresh.title; }
    }).catch(function () {}).finally(function () {
      busy = false;
      if (again) { again = false; refresh(); }
    });
  }
  if (window.EventSource) { new EventSource("/events").onmessage = refresh; }
})();
"""

STYLE = """\
body { font: 14px/1.4 system-ui, sans-serif; margin: 0; color: #1b1f23; background: #f6f8fa; }
header { padding: 12px 20px; color: #fff; }
header.ok { background: #1a7f37; } header.degraded { background: #9a6700; } header.failing { background: #cf222e; }
header h1 { margin: 0; font-size: 20px; } header p { margin: 4px 0 0; } header a { color: #fff; }
main { padding: 8px 20px 40px; }
section { margin-top: 16px; }
h2 { font-size: 16px; border-bottom: 1px solid #d0d7de; padding-bottom: 4px; }
h3 { font-size: 14px; margin: 12px 0 4px; }
table { border-collapse: collapse; width: 100%; background: #fff; }
th, td { text-align: left; padding: 3px 8px; border-bottom: 1px solid #eaeef2; vertical-align: top; }
.small { font-size: 12px; color: #57606a; font-weight: normal; } header .small { color: #eee; }
.badge { display: inline-block; padding: 0 6px; border-radius: 8px; font-size: 12px; color: #fff; }
.badge.ok { background: #1a7f37; } .badge.degraded { background: #9a6700; } .badge.failing { background: #cf222e; }
.warn { color: #9a6700; } .error { color: #cf222e; white-space: pre-wrap; }
code { font-size: 12px; background: #eaeef2; padding: 0 3px; }
svg.spark { vertical-align: middle; margin-left: 8px; }
tr.event.check_failed td, tr.event.rollback td, tr.event.quarantine td, tr.event.down td { color: #cf222e; }
tr.event.recovered td { color: #1a7f37; }
"""


@dataclass(frozen=True)
class MemberRow:
    endpoint: str
    weight: int
    node: str
    id: str
    meta: tuple[tuple[str, str], ...]
    serving: bool | None
    paused: bool
    health: str = "passing"
    output: str = ""


@dataclass(frozen=True)
class UpstreamView:
    upstream: str
    label: str
    members: markupsafe.Markup  # the table's rows (empty: no member)
    rejected: tuple[str, ...]
    kept: bool
    latencies: tuple[float, ...]
    held: str = ""  # the shrink guard holds a drop of this service: what and until when


def _clock(value: float | None) -> str:
    return time.strftime("%H:%M:%S", time.localtime(value)) if value else ""


def _master(pid_file: str) -> str:
    """The nginx master and its current worker generation (when those workers started)."""
    try:
        master = nginx_master(Path(pid_file))
    except ReloadError as exc:
        return str(exc)
    if master is None:
        return f"not running (no live master in {pid_file})"
    try:
        workers = current_workers(master)
        started = min((process_start_time(w) for w in workers), default=None)
    except (psutil.NoSuchProcess, psutil.AccessDenied):
        workers, started = [], None
    generation = f"; {len(workers)} workers started {_clock(started)}" if started else ""
    return f"PID {master.pid}{generation}"


def _latencies(events: tuple[TimelineEvent, ...]) -> dict[str, list[float]]:
    """Per service label, the change-to-reload time of each change that a reload carried."""
    pending: set[str] = set()
    out: dict[str, list[float]] = {}
    for event in events:
        if event.kind == "change" and event.subject:
            pending.add(event.subject)
        elif event.kind == "reload" and event.latency is not None:
            for label in pending:
                out.setdefault(label, []).append(event.latency)
            pending.clear()
    return out


def sparkline(values: tuple[float, ...]) -> markupsafe.Markup:
    """Bars of the recent change-to-reload times, in inline SVG (no chart library)."""
    width, height, bar = 120, 18, 6
    shown = values[-(width // bar) :]
    top = max(shown) or 1.0
    rect = markupsafe.Markup('<rect x="{}" y="{:.1f}" width="{}" height="{:.1f}" fill="#0969da"></rect>')
    bars = markupsafe.Markup("").join(
        rect.format(i * bar, height - max(1.0, v / top * height), bar - 1, max(1.0, v / top * height))
        for i, v in enumerate(shown)
    )
    title = f"change to reload: last {shown[-1] * 1000:.0f} ms, max {top * 1000:.0f} ms"
    svg = markupsafe.Markup(
        '<svg class="spark" width="{}" height="{}" role="img" aria-label="{}"><title>{}</title>{}</svg>'
    )
    return svg.format(width, height, title, title, bars)


def _health_badge(health: str) -> str:
    return "ok" if health == "passing" else "degraded" if health in ("warning", "kept", "held") else "failing"


_SERVING = {
    None: "?",
    True: '<span class="badge ok">serving</span>',
    False: '<span class="badge degraded">not yet</span>',
}


def _row_parts(m: MemberRow) -> tuple[str, str]:
    """A member's row, escaped, less its `nginx` cell: (before it, after it)."""
    esc = html.escape
    output = f'<span class="small">{esc(m.output)}</span>' if m.output else ""
    meta = "".join(f"<code>{esc(k)}={esc(v)}</code> " for k, v in m.meta)
    head = (
        f'<tr class="member"><td class="endpoint">{esc(m.endpoint)}</td><td>{m.weight}</td>\n'
        f'<td><span class="badge {_health_badge(m.health)}">{esc(m.health)}</span>\n{output}</td>\n'
    )
    return head, f"<td>{esc(m.node)} / {esc(m.id)}</td>\n<td>{meta}</td></tr>\n"


def _nginx_cell(serving: bool | None, paused: bool) -> str:
    pause = '<span class="badge failing">paused by nginx (failed requests)</span>' if paused else ""
    return f"<td>{_SERVING[serving]}\n{pause}</td>\n"


def member_rows(members: tuple[MemberRow, ...]) -> markupsafe.Markup:
    """Members' table rows, every registry value escaped (written here, not by the template's
    loop: at ten thousand members these rows are the page's cost)."""
    rows = []
    for m in members:
        head, tail = _row_parts(m)
        rows.append(head + _nginx_cell(m.serving, m.paused) + tail)
    return markupsafe.Markup("".join(rows))  # noqa: S704 - every value in the rows went through html.escape


class _RowCache:
    """Each passing instance's escaped row parts, kept while the instance (an immutable value the
    registry view keeps until its service changes) is on the page: a page at 10k members escapes
    only what changed since the last one. Entries not used by a page are dropped after it."""

    def __init__(self) -> None:
        self._entries: dict[int, tuple[ServiceInstance, str, str, str]] = {}
        self._used: dict[int, tuple[ServiceInstance, str, str, str]] = {}
        self.built = 0  # rows escaped anew (what a test counts)

    def parts(self, instance: ServiceInstance) -> tuple[str, str, str]:
        """(endpoint, head, tail) of `instance`'s row."""
        key = id(instance)
        entry = self._entries.get(key)
        if entry is None or entry[0] is not instance:
            endpoint = str(instance.endpoint)
            row = MemberRow(
                endpoint, instance.weight, instance.node, instance.id, tuple(sorted(instance.meta.items())), None, False
            )
            entry = (instance, endpoint, *_row_parts(row))
            self.built += 1
        self._used[key] = entry
        return entry[1], entry[2], entry[3]

    def page_done(self) -> None:
        self._entries, self._used = self._used, {}


class StatusPage:
    """Renders the page from a snapshot; reads the installed files to tell what nginx serves."""

    def __init__(self, version: str, warning: str = "") -> None:
        self.version = version
        self.warning = warning  # shown in the header (a status listener reachable beyond this host)
        env = jinja2.Environment(
            autoescape=True, trim_blocks=True, lstrip_blocks=True, undefined=jinja2.StrictUndefined
        )
        env.globals["sparkline"] = sparkline
        self.template = env.from_string(PAGE)
        self.rows = _RowCache()
        self.served = _ServedEndpoints()

    def render(self, snapshot: StatusSnapshot) -> str:
        state, reason = snapshot.state()
        events = snapshot.timeline
        return self.template.render(
            state=state,
            reason=reason,
            version=self.version,
            warning=self.warning,
            now=_clock(time.time()),
            mode=snapshot.mode,
            cycles=snapshot.cycles,
            registry_kind=snapshot.registry_kind,
            registry_name=snapshot.registry_name,
            registry_address=", ".join(map(without_credentials, snapshot.registry_address.split(", "))),
            registry_reachable=snapshot.registry_reachable,
            registry_error=snapshot.registry_error,
            registry_down_since=_clock(snapshot.registry_down_since),
            master=_master(snapshot.pid_file),
            last_reload=_clock(max((t.last_reload or 0 for t in snapshot.templates), default=0) or None),
            not_reloaded=snapshot.not_reloaded,
            draining=snapshot.budget.describe() if snapshot.budget else "",
            deferred=f"reload deferred {snapshot.budget.deferred_for:.0f} s: {snapshot.budget.deferred}"
            if snapshot.budget and snapshot.budget.deferred
            else "",
            quarantined=[q for t in snapshot.templates for q in t.quarantined],
            check_error="" if snapshot.last_sync_ok else snapshot.last_sync_error,
            upstreams=self._upstreams_once(snapshot, _latencies(events)),
            waiting=snapshot.waiting_for_first_answer,
            templates=[
                {
                    "destination": t.destination,
                    "last_render": _clock(t.last_render),
                    "last_reload": _clock(t.last_reload),
                    "last_error": t.last_error,
                }
                for t in snapshot.templates
            ],
            events=[
                {"time": _clock(e.at), "kind": e.kind, "text": e.text, "subject": e.subject, "latency": e.latency}
                for e in reversed(events)
            ],
        )

    def _upstreams_once(self, snapshot: StatusSnapshot, latencies: Mapping[str, list[float]]) -> list[UpstreamView]:
        try:
            return self._upstreams(snapshot, latencies)
        finally:
            self.rows.page_done()

    def _upstreams(self, snapshot: StatusSnapshot, latencies: Mapping[str, list[float]]) -> list[UpstreamView]:
        installed = self.served.of([t.destination for t in snapshot.templates])
        kept = {label for t in snapshot.templates for label in t.kept}
        held = {str(h["service"]): h for h in snapshot.guard_held}
        views = []
        for label, view in sorted(snapshot.services.items()):
            name = view.instances[0].name if view.instances else label
            try:
                upstream = upstream_name_for(name)
            except UnsafeValueError:
                upstream = name
            hold = held.get(label)
            losing = frozenset(str(e) for e in hold["losing"]) if hold is not None else frozenset()
            until = _clock(hold["applies_at"]) if hold is not None else ""
            members = self._members(
                snapshot, upstream, view, installed, snapshot.kept_members.get(label, ()), losing, until
            )
            views.append(
                UpstreamView(
                    upstream=upstream,
                    label=label,
                    members=members,
                    rejected=tuple(str(r) for r in view.rejected),
                    kept=label in kept,
                    latencies=tuple(latencies.get(label, ())),
                    held=""
                    if hold is None
                    else f"shrink guard: drop of {len(hold['losing'])} of {hold['previous']} members held "
                    f"until {_clock(hold['applies_at'])} (max_drop {hold['max_drop']})",
                )
            )
        return views

    def _members(
        self,
        snapshot: StatusSnapshot,
        upstream: str,
        view: HealthView,
        installed: frozenset[str] | None,
        kept: tuple[ServiceInstance, ...] = (),
        losing: frozenset[str] = frozenset(),
        held_until: str = "",
    ) -> markupsafe.Markup:
        live = snapshot.live
        pushed: set[str] | None = None
        paused: Mapping[str, float] = {}
        if live is not None:
            up = live.upstreams.get(upstream)
            pushed = {str(format_endpoint(m.host, m.port)) for m in up.members} if up is not None else set()
            paused = live.unavailable.get(upstream, {})

        def served(endpoint: str) -> bool | None:
            """Whether nginx has this member now: pushed (live mode), or in the installed file."""
            if pushed is not None:
                return endpoint in pushed
            return endpoint in installed if installed is not None else None

        html_rows = []
        # The shrink guard holds a drop: the members the registry dropped stay, marked `held`.
        rows = [
            MemberRow(str(i.endpoint), i.weight, i.node, i.id, tuple(sorted(i.meta.items())), served(str(i.endpoint)),
                      False, "held", f"dropped by the registry; kept by the shrink guard until {held_until}")
            for i in view.instances if str(i.endpoint) in losing
        ]  # fmt: skip
        for i in view.instances:
            if str(i.endpoint) in losing:
                continue
            endpoint, head, tail = self.rows.parts(i)
            html_rows.append(head + _nginx_cell(served(endpoint), endpoint in paused) + tail)
        # on_empty = "keep": the last known members, which nginx still has.
        rows += [
            MemberRow(str(i.endpoint), i.weight, i.node, i.id, tuple(sorted(i.meta.items())), served(str(i.endpoint)),
                      False, "kept", "last known member, kept by on_empty while the service has no passing instance")
            for i in kept
        ]  # fmt: skip
        # Not passing: the registry keeps them out of the templates.
        rows += [
            MemberRow(m.endpoint, m.weight, m.node, m.id, (), served(m.endpoint), False, m.status, m.output)
            for m in view.unhealthy
        ]
        passing = markupsafe.Markup("".join(html_rows))  # noqa: S704 - the cached parts are escaped (_row_parts)
        return passing + member_rows(tuple(rows))


SERVER_LINE = re.compile(r"\bserver\s+(\S+?);?\s")


class _ServedEndpoints:
    """Every `server HOST:PORT` in the installed files, as a set, so the page costs time linear in
    the members (not members x file size); searched again only when a file changed (its size,
    modification time or inode), not on every page."""

    def __init__(self) -> None:
        self._key: tuple[tuple[str, int, int, int], ...] | None = None
        self._served: frozenset[str] | None = None
        self.searches = 0

    def of(self, destinations: Sequence[str]) -> frozenset[str] | None:
        """None when there is no installed file to read."""
        key = tuple(_signature(path) for path in destinations)
        if key != self._key:
            texts = [_read(Path(path)) for path in destinations]
            self.searches += 1
            self._served = (
                frozenset(match.group(1) for text in texts for match in SERVER_LINE.finditer(text))
                if any(texts)
                else None
            )
            self._key = key
        return self._served


def _signature(path: str) -> tuple[str, int, int, int]:
    try:
        st = os.stat(path)
    except OSError:
        return (path, -1, -1, -1)
    return (path, st.st_size, st.st_mtime_ns, st.st_ino)


def _read(path: Path) -> str:
    try:
        return path.read_text(errors="replace")
    except OSError:
        return ""
