"""Live mode: members go to nginx through confpy's Lua admin API instead of a reload.

The rendered file names the upstreams; their members are written to a state file (atomically,
before every push, so a restarted nginx starts from them) and pushed to the admin API on
`[nginx] live_listen`. Only a change to the set of upstreams, or to the template, changes the
rendered bytes and so needs a reload.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import os
import re
import secrets
import stat
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import confpy
from confpy.apply.files import KnownFiles, StateStore
from confpy.apply.nginx import NginxReloader
from confpy.config import Config, split_host_port
from confpy.errors import ConfpyError
from confpy.model import ServiceInstance, format_endpoint, nginx_time_seconds
from confpy.registry.view import registry_view
from confpy.render.functions import UpstreamSettings
from confpy.render.renderer import RenderResult
from confpy.retry import Backoff, RetryPolicy
from confpy.wire.client import HTTPClient, TransportError

log = logging.getLogger(__name__)

ADMIN_TIMEOUT = 5.0
# nginx's own defaults for a `server` line, which the Lua balancer follows.
DEFAULT_MAX_FAILS = 1
DEFAULT_FAIL_TIMEOUT = 10.0
INITIAL_RETRY = 0.25
# How often to look (locally, with psutil) for an nginx that reloaded or restarted.
CHECK_INTERVAL = 5.0
RESOLVE_TIMEOUT = 5.0


class LivePushError(ConfpyError):
    """The admin API could not be reached or refused the members."""


class LiveRefused(LivePushError):
    """The admin API answered, and refused one upstream's members (the others are still pushed)."""


class PartialPush(LivePushError):
    """Some upstreams' members were refused; `pushed` names the ones that landed."""

    def __init__(self, message: str, pushed: list[str]) -> None:
        super().__init__(message)
        self.pushed = pushed


def lua_dir() -> Path:
    """Where confpy's Lua module is installed (a template variable for lua_package_path)."""
    return Path(confpy.__file__).resolve().parent / "lua"


# confpy.lua's check_members, rule for rule: a member it would refuse is left out here, so one
# member never gets a whole upstream's push refused.
_LUA_IPV4 = re.compile(r"^(\d+)\.(\d+)\.(\d+)\.(\d+)$")
_LUA_IPV6 = re.compile(r"^[0-9A-Fa-f:.]+$")


def _lua_accepts_host(host: str) -> bool:
    ipv4 = _LUA_IPV4.match(host)
    if ipv4 is not None:
        return all(int(part) <= 255 for part in ipv4.groups())
    return ":" in host and _LUA_IPV6.match(host) is not None and len(host) <= 45


@dataclass(frozen=True, order=True)
class LiveMember:
    """One member as the Lua balancer takes it: nginx's `server` parameters, times in seconds."""

    host: str
    port: int
    weight: int = 1
    max_fails: int = DEFAULT_MAX_FAILS
    fail_timeout: float = DEFAULT_FAIL_TIMEOUT
    backup: bool = False

    def to_json(self) -> dict[str, Any]:
        data: dict[str, Any] = {"host": self.host, "port": self.port, "weight": self.weight}
        data.update(max_fails=self.max_fails, fail_timeout=self.fail_timeout)
        if self.backup:
            data["backup"] = True
        return data

    def problem(self) -> str | None:
        """What confpy.lua's balancer would refuse in this member (its rules exactly); None: nothing."""
        if not _lua_accepts_host(self.host):
            return f"host {self.host!r} is not an IP address (a host name that did not resolve when it was fetched)"
        if not 1 <= self.port <= 65535:
            return f"port {self.port} is not from 1 to 65535"
        if self.weight < 1:
            return f"weight {self.weight} is not a positive integer"
        if self.max_fails < 0:
            return f"max_fails {self.max_fails} is negative"
        if not self.fail_timeout > 0:
            return f"fail_timeout {self.fail_timeout:g}s is not more than 0s (the live balancer needs a positive time)"
        return None


@dataclass(frozen=True)
class LiveUpstream:
    """The members of one upstream, as pushed, its balancing method (None: round-robin), and their
    version (a digest of both)."""

    version: str
    members: tuple[LiveMember, ...]
    balance: Mapping[str, Any] | None = None
    # Instances left out (the balancer would refuse them), each with why: not pushed, not in `version`.
    left_out: tuple[str, ...] = ()

    def to_json(self) -> dict[str, Any]:
        data: dict[str, Any] = {"version": self.version, "members": [m.to_json() for m in self.members]}
        if self.balance is not None:
            data["balance"] = dict(self.balance)
        return data

    def status_json(self) -> dict[str, Any]:
        """As /status shows it: what is pushed, and the members left out."""
        data = self.to_json()
        if self.left_out:
            data["left_out"] = list(self.left_out)
        return data


NO_SETTINGS = UpstreamSettings()


def live_member(instance: ServiceInstance, settings: UpstreamSettings = NO_SETTINGS) -> LiveMember:
    """An instance's member: its meta's max_fails/fail_timeout, else the upstream's KV settings, else
    nginx's defaults (max_fails=1, fail_timeout=10s); backup by tag or meta, or by KV `backup_tag`;
    its host the IP the registry's answer resolved (a host name is resolved off the loop when fetched)."""
    max_fails = instance.max_fails if instance.max_fails is not None else settings.max_fails
    fail_timeout = instance.fail_timeout or settings.fail_timeout
    return LiveMember(
        host=instance.ip or instance.address,  # a host name was resolved (off the loop) when it was fetched
        port=instance.port,
        weight=instance.weight,
        max_fails=DEFAULT_MAX_FAILS if max_fails is None else max_fails,
        fail_timeout=DEFAULT_FAIL_TIMEOUT if fail_timeout is None else nginx_time_seconds(fail_timeout),
        backup=instance.backup or (settings.backup_tag is not None and settings.backup_tag in instance.tags),
    )


def live_upstream(instances: Sequence[ServiceInstance], settings: UpstreamSettings = NO_SETTINGS) -> LiveUpstream:
    """The members to push; an instance the balancer would refuse (`LiveMember.problem`, or a second
    member at one host and port) is left out and named in `left_out`, the others still pushed."""
    valid: dict[LiveMember, ServiceInstance] = {}
    left_out: list[str] = []
    for instance in instances:
        member = live_member(instance, settings)
        problem = member.problem()
        if problem is None:
            valid.setdefault(member, instance)
        else:
            left_out.append(f"instance {instance.id!r} of {instance.name!r} ({instance.endpoint}): {problem}")
    kept: dict[tuple[str, int], LiveMember] = {}
    for member, instance in sorted(valid.items()):
        first = kept.setdefault((member.host, member.port), member)
        if first is not member:
            left_out.append(
                f"instance {instance.id!r} of {instance.name!r} ({instance.endpoint}): a second member at "
                f"{format_endpoint(member.host, member.port)} with other parameters"
            )
    members = tuple(kept.values())
    balance = settings.balance_json()
    listed: list[Any] = [m.to_json() for m in members]
    if balance is not None:  # round-robin upstreams keep the digest they had before balance existed
        listed.append(balance)
    digest = hashlib.sha256(json.dumps(listed).encode()).hexdigest()[:16]
    return LiveUpstream(digest, members, balance, tuple(left_out))


ADMIN_TOKEN = re.compile(rb"[\x21-\x7e]{32,}")  # what nginx's side accepts, and one header can carry


def ensure_admin_token(path: Path) -> None:
    """Create the admin API's token (random, mode 0600) unless it exists; kept across restarts so a
    running nginx, which read it at its last start or reload, keeps accepting confpy."""
    if path.exists():
        check_token_mode(path)
        return
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        return
    except OSError as exc:
        raise LivePushError(f"{path}: cannot create the live admin API's token: {exc.strerror}") from None
    with os.fdopen(fd, "w") as token:
        token.write(secrets.token_hex(32) + "\n")


def check_token_mode(path: Path) -> None:
    """The admin token moves production traffic: LivePushError when other users may read it, or
    anyone but its owner may change it."""
    try:
        mode = stat.S_IMODE(path.stat().st_mode)
    except OSError as exc:
        raise LivePushError(f"cannot inspect the live admin API's token {path}: {exc.strerror}") from None
    if mode & (stat.S_IROTH | stat.S_IWOTH | stat.S_IWGRP):
        raise LivePushError(
            f"the live admin API's token {path} is readable or writable by other users (mode {mode:04o}); whoever "
            f"reads it can move production traffic: chmod 600 {path} (or remove it and confpy makes a new one)"
        )


def ensure_socket_dir(listen: str) -> None:
    """A Unix socket's folder, mode 0700: nginx's master (root) creates the socket there with mode
    0666, so the folder is what keeps everyone but root (confpy) out."""
    if not listen.startswith("unix:"):
        return
    folder = Path(listen[5:]).parent
    if folder.is_dir():
        # Not ours (it may be /run or /tmp): its mode stays as the system set it.
        mode = stat.S_IMODE(folder.stat().st_mode)
        if mode & (stat.S_IXOTH | stat.S_IXGRP):
            log.warning(
                "the live admin socket's folder %s is open to other users (mode %04o): any local user can reach "
                "the admin API and only its token keeps them out; use a folder of confpy's own, e.g. "
                'live_listen = "unix:/run/confpy/admin.sock" (created mode 0700)',
                folder,
                mode,
            )
        return
    try:
        folder.mkdir(parents=True, mode=0o700)
        os.chmod(folder, 0o700)  # mkdir's mode is masked by the umask
    except FileExistsError:
        return  # created meanwhile by someone else: not ours either
    except OSError as exc:
        raise LivePushError(f"{folder}: cannot prepare the admin socket's folder: {exc.strerror}") from None


def read_admin_token(path: Path) -> str:
    """The token in `path`, as nginx's Lua reads it: the file less its trailing whitespace. It is
    sent as one HTTP header and nginx accepts one of at least 32 characters, so anything else is
    refused here, saying what is wrong with it (never showing it)."""
    try:
        token = path.read_bytes().rstrip()
    except OSError as exc:
        raise LivePushError(
            f"cannot read the live admin API's token {path}: {exc.strerror} (it is readable by root only)"
        ) from None
    if not ADMIN_TOKEN.fullmatch(token):
        raise LivePushError(
            f"the live admin API's token in {path} is not one line of at least 32 printable ASCII characters "
            "without spaces (nginx refuses any other); remove the file and confpy makes a new one"
        )
    return token.decode("ascii")


class LiveAdmin:
    """A client for the Lua admin API: a Unix socket (or loopback TCP), the token on every request,
    short timeouts, one kept-alive session."""

    def __init__(self, listen: str, token_file: Path) -> None:
        self.listen = listen
        self.token_file = token_file
        self.socket_path: str | None = None
        if listen.startswith("unix:"):
            self.socket_path = listen[5:]
            self.base = "http://confpy-admin"
        else:
            host, port = split_host_port(listen)
            host = "127.0.0.1" if host in ("", "0.0.0.0") else ("::1" if host == "::" else host)
            self.base = f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"
        self._client: HTTPClient | None = None
        self._last_answer: tuple[str, Any] | None = None  # a GET's text and what it decoded to

    async def close(self) -> None:
        if self._client is not None:
            await self._client.close()
            self._client = None

    async def _request(self, method: str, path: str, body: Any = None) -> tuple[int, Any]:
        if self._client is None:
            self._client = HTTPClient(
                self.base,
                unix_path=self.socket_path,
                connect_timeout=ADMIN_TIMEOUT,
                headers={"Authorization": f"Bearer {read_admin_token(self.token_file)}", "X-Confpy-Push": "1"},
            )
        payload = b"" if body is None else json.dumps(body).encode()
        headers = {"Content-Type": "application/json"} if body is not None else None
        try:
            async with asyncio.timeout(ADMIN_TIMEOUT):
                response = await self._client.request(method, path, headers=headers, body=payload)
            text = response.body.decode("utf-8", "replace")
            status = response.status
        except (TransportError, TimeoutError) as exc:
            reason = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
            raise LivePushError(
                f"live admin API at {self.listen} is unreachable ({reason}); is the live template included in nginx?"
            ) from None
        if method == "GET" and self._last_answer is not None and self._last_answer[0] == text:
            return status, self._last_answer[1]  # GET /upstreams as last time: not decoded again
        try:
            data = json.loads(text)
        except ValueError:
            return status, {"error": text[:200]}
        if method == "GET" and status == 200:
            # nginx's whole member list (a megabyte at 1,000 upstreams x 10 members), read every
            # CHECK_INTERVAL and nearly always the same: decoding it was most of an idle daemon's CPU.
            self._last_answer = (text, data)
        return status, data

    async def upstreams(self) -> dict[str, Any]:
        """GET /upstreams: every upstream nginx defines, with its version and members."""
        status, data = await self._request("GET", "/upstreams")
        if status != 200 or not isinstance(data, dict):
            raise LivePushError(f"live admin API at {self.listen} answered GET /upstreams with {status}: {data}")
        return data

    async def versions(self) -> dict[str, str | None]:
        """Each upstream nginx defines, with the version it serves."""
        return {
            name: (entry.get("version") if isinstance(entry, dict) else None)
            for name, entry in (await self.upstreams()).items()
        }

    async def put(self, name: str, upstream: LiveUpstream) -> None:
        """PUT /upstreams/NAME with the whole member list."""
        status, data = await self._request("PUT", f"/upstreams/{name}", upstream.to_json())
        if status != 200:
            error = data.get("error") if isinstance(data, dict) else data
            raise LiveRefused(f"live admin API refused the members of {name!r} ({status}): {error}")


def wanted_members(upstream: LiveUpstream) -> frozenset[tuple[str, int, int, bool]]:
    """What drift detection compares of confpy's members: address, weight, backup."""
    return frozenset((m.host, m.port, m.weight, m.backup) for m in upstream.members)


def served_members(members: object) -> frozenset[tuple[str, int, int, bool]] | None:
    """The same of the members nginx's admin API reports (None when they are not a list of objects)."""
    if not isinstance(members, list):
        return None
    out = set()
    for m in members:
        if not isinstance(m, dict):
            return None
        out.add((str(m.get("host")), _as_int(m.get("port")), _as_int(m.get("weight", 1)), m.get("backup") is True))
    return frozenset(out)


def _as_int(value: object) -> int:
    return int(value) if isinstance(value, int | float) else -1


def passive_unavailable(served: Mapping[str, Any]) -> dict[str, dict[str, float]]:
    """From GET /upstreams: the members nginx's balancer has paused, per upstream."""
    paused: dict[str, dict[str, float]] = {}
    for name, entry in served.items():
        members = entry.get("members") if isinstance(entry, dict) else None
        for member in members if isinstance(members, list) else []:
            if isinstance(member, dict) and member.get("unavailable"):
                endpoint = format_endpoint(str(member.get("host")), int(member.get("port", 0)))
                paused.setdefault(str(name), {})[endpoint] = float(member.get("unavailable_until") or 0)
    return paused


class LiveUpstreams:
    """LiveUpstream values per upstream, computed once per member tuple (a render that reused a
    fragment hands over the very same tuple, so a thousand unchanged upstreams cost nothing)."""

    def __init__(self) -> None:
        self._cache: dict[str, tuple[tuple[ServiceInstance, ...], UpstreamSettings, LiveUpstream]] = {}
        self._json: dict[str, tuple[LiveUpstream, str]] = {}

    def get(
        self, name: str, instances: tuple[ServiceInstance, ...], settings: UpstreamSettings = NO_SETTINGS
    ) -> LiveUpstream:
        cached = self._cache.get(name)
        if cached is None or cached[0] is not instances or cached[1] != settings:
            upstream = live_upstream(instances, settings)
            for why in upstream.left_out:
                log.warning("upstream %s: left out of the live push: %s", name, why)
            cached = self._cache[name] = (instances, settings, upstream)
        return cached[2]

    def desired(self, result: RenderResult) -> dict[str, LiveUpstream]:
        """The members every live upstream of `result` should have (upstreams with none keep what nginx has)."""
        wanted: dict[str, LiveUpstream] = {}
        for name in result.live:
            self.update(wanted, result, name)
        return wanted

    def update(self, wanted: dict[str, LiveUpstream], result: RenderResult, name: str) -> None:
        """Set (or drop) upstream `name` of `wanted` as `result` has it."""
        instances = result.live.get(name)
        if instances:
            wanted[name] = self.get(name, instances, result.live_settings.get(name, NO_SETTINGS))
            return
        wanted.pop(name, None)
        if instances is not None:
            log.warning(
                "%s: upstream %s has no member to push; nginx keeps its current members",
                result.template.destination,
                name,
            )

    def state_json(self, name: str, upstream: LiveUpstream) -> str:
        """One upstream's entry in the state file, serialized once per version."""
        cached = self._json.get(name)
        if cached is None or cached[0] is not upstream:
            cached = self._json[name] = (
                upstream,
                json.dumps(upstream.to_json(), sort_keys=True, separators=(",", ":")),
            )
        return cached[1]

    def state_bytes(self, result: RenderResult) -> bytes:
        """A live template's member state file, as nginx's init_by_lua reads it: the bytes of
        `json.dumps({"upstreams": ..., "version": 1}, sort_keys=True)`, each upstream's part kept
        from its last serialization (only changed upstreams are serialized again); an upstream
        whose every member was left out is not listed."""
        listed = (
            (name, self.get(name, instances, result.live_settings.get(name, NO_SETTINGS)))
            for name, instances in sorted(result.live.items())
            if instances
        )
        parts = [json.dumps(name) + ":" + self.state_json(name, up) for name, up in listed if up.members]
        return ('{"upstreams":{' + ",".join(parts) + '},"version":1}\n').encode()


async def state_bytes(result: RenderResult) -> bytes:
    """A live template's member state file (for `--dry-run`)."""
    return LiveUpstreams().state_bytes(result)


@dataclass(frozen=True)
class LiveStatus:
    """What /status shows of live mode."""

    last_error: str
    upstreams: Mapping[str, LiveUpstream]
    # Members nginx's balancer has paused after failures (passive health) though the registry
    # still calls them passing: upstream -> "host:port" -> Unix time until which it is paused.
    unavailable: Mapping[str, Mapping[str, float]] = field(default_factory=dict)
    # Upstreams whose members were changed behind confpy's back, with when it last saw it.
    drift: Mapping[str, float] = field(default_factory=dict)


def _ignore(*args: object) -> None:
    return None


@dataclass(frozen=True)
class LiveHooks:
    """What the daemon's metrics hear of live mode: member lists pushed (a count), a push failed,
    the members nginx's balancer paused (upstream -> member -> until), an upstream found drifted."""

    pushed: Callable[[int], None] = _ignore
    failed: Callable[[], None] = _ignore
    unavailable: Callable[[Mapping[str, Mapping[str, float]]], None] = _ignore
    drift: Callable[[str], None] = _ignore


class LiveSupervisor:
    """Everything about live mode: wanted members, state files, pushes, retries, nginx generations.

    The daemon hands it each cycle's renders (`note`, `save_state`), asks it to push after the install, and
    gives it the clock's turn (`on_timer`) when `next_deadline` passes: it retries a failed push
    with backoff, and re-pushes when nginx's workers changed (nginx reloaded or restarted and
    lost the members pushed to the old ones).
    """

    def __init__(
        self,
        config: Config,
        state: StateStore,
        reloader: NginxReloader,
        clock: Callable[[], float] = time.monotonic,
        hooks: LiveHooks | None = None,
        files: KnownFiles | None = None,
    ) -> None:
        self.config = config
        self.registry = registry_view(config)  # retries back off as far as the registry's max_backoff
        self.state = state
        self.reloader = reloader
        self.clock = clock
        self.admin = LiveAdmin(config.nginx.live_listen, config.nginx.live_token_file)
        # What nginx is known to serve; None after a failure or when nginx may have restarted.
        self.known: dict[str, str | None] | None = None
        self._by_template: dict[Path, dict[str, LiveUpstream]] = {}
        self._noted: dict[Path, int] = {}  # the serial of each template's render last noted
        self.upstreams = LiveUpstreams()
        self.wanted: dict[str, LiveUpstream] = {}
        # Upstreams of `wanted` changed since the last successful push; None: look at every one.
        self._dirty: set[str] | None = None
        self.walked = 0  # upstreams looked at by `note` and `push` (tests: it must not grow with the catalog)
        self.files = files if files is not None else KnownFiles()  # the state files' bytes, as last written
        self.error = ""
        self.backoff = Backoff(RetryPolicy(INITIAL_RETRY, self.registry.max_backoff))
        self.retry_at: float | None = None
        self.check_at: float | None = None
        self.generation: tuple[int, ...] = ()
        self.generation_unknown = True  # until read after the first push, and again after a reload
        hooks = hooks or LiveHooks()
        self.on_pushed = hooks.pushed
        self.on_failure = hooks.failed
        self.on_unavailable = hooks.unavailable
        self.on_drift = hooks.drift
        self.drift_events: dict[str, float] = {}  # upstream -> Unix time of the last drift seen
        self.clock_wall: Callable[[], float] = time.time
        self.unavailable: dict[str, dict[str, float]] = {}
        self._passive_of: object = None  # the GET /upstreams answer `unavailable` was read from

    def state_path(self, destination: Path) -> Path:
        return self.state.live_path_for(destination)

    def prepare(self) -> None:
        """The admin API's token and socket folder, before nginx may need them."""
        ensure_admin_token(self.config.nginx.live_token_file)
        ensure_socket_dir(self.config.nginx.live_listen)

    async def note(self, results: Sequence[RenderResult]) -> None:
        """Take each template's wanted members (a cycle may render only some templates: the
        other templates' members are kept); host names were resolved (off the loop) with the
        registry's answer."""
        touched: set[str] = set()
        everything = False
        for result in results:
            dest = result.template.destination
            mine = self._by_template.get(dest)
            if mine is not None and result.live_changed is not None and self._noted.get(dest) == result.live_base:
                # Only the upstreams the render redid: the others are the very ones noted last time.
                for name in result.live_changed:
                    self.upstreams.update(mine, result, name)
                touched.update(result.live_changed)
                self.walked += len(result.live_changed)
            else:
                self._by_template[dest] = self.upstreams.desired(result)
                self.walked += len(result.live)
                everything = True
            self._noted[dest] = result.serial
        if everything:
            self.wanted = {name: up for wanted in self._by_template.values() for name, up in wanted.items()}
            self._dirty = None
            return
        for name in touched:
            found = [wanted[name] for wanted in self._by_template.values() if name in wanted]
            if found:
                self.wanted[name] = found[-1]  # as the merge above: the last template's wins
            else:
                self.wanted.pop(name, None)
        if self._dirty is not None:
            self._dirty.update(touched)

    def save_state(self, results: Sequence[RenderResult]) -> None:
        """Write each live template's state file (atomically, when it changed).

        Before a reload (nginx's new workers load it) and after a push (a later restart starts
        from it); the push itself does not wait for the disk.
        """
        for result in results:
            if result.live:
                path = self.state_path(result.template.destination)
                data = self.upstreams.state_bytes(result)
                if self.files.read(path) != data:
                    self.files.write(path, data, 0o644)

    def nginx_reloaded(self) -> None:
        """nginx has new workers: ask it what it serves before the next push."""
        self.known = None
        self.generation_unknown = True

    async def push(self) -> list[str]:
        """Push every upstream whose version in nginx differs; skipped while nginx is not running."""
        if not self.wanted:
            self._dirty = set()
            return []
        try:
            return await self._push()
        except PartialPush:
            raise  # nginx answered: it runs
        except LivePushError:
            # Only now look for nginx's master (psutil): a push is the fast path, a failure is not.
            if not self.reloader.running():
                log.warning("live members not pushed: nginx is not running (it will load them from the state file)")
                return []
            raise

    async def _push(self) -> list[str]:
        dirty = self._dirty if self.known is not None else None
        names = sorted(self.wanted) if dirty is None else sorted(name for name in dirty if name in self.wanted)
        self.walked += len(names)
        if self.known is None or any(name not in self.known for name in names):
            self.known = await self.admin.versions()
        current = self.known
        pushed: list[str] = []
        refused: list[str] = []
        refused_names: list[str] = []
        try:
            for name in names:
                upstream = self.wanted[name]
                if name not in current:
                    continue  # not in nginx's configuration yet: it arrives with the reload, members from the state file
                if current[name] != upstream.version:
                    try:
                        await self.admin.put(name, upstream)
                    except LiveRefused as exc:  # one upstream refused: the others are still pushed
                        refused.append(str(exc))
                        refused_names.append(name)
                        continue
                    current[name] = upstream.version
                    pushed.append(name)
                    log.info(
                        "pushed %d members to upstream %s (version %s) without a reload",
                        len(upstream.members),
                        name,
                        upstream.version,
                    )
        except LivePushError:
            self.known = None
            raise
        self._dirty = set(refused_names)  # a refused upstream is tried again with the next push
        if refused:
            raise PartialPush("; ".join(refused), pushed)
        return pushed

    def pushed(self) -> None:
        """A push (or a check that nothing needed pushing) succeeded."""
        if self.error:
            log.info("live push works again")
        self.error = ""
        self.backoff.succeeded()
        self.retry_at = None
        if self.generation_unknown:
            # psutil walks nginx's processes (a few ms): only after a reload, not after every push;
            # a generation that changes behind confpy's back is found by the next on_timer check.
            self.generation = self.reloader.worker_pids()
            self.generation_unknown = not self.generation

    def failed(self, exc: LivePushError) -> None:
        self.on_failure()
        if not self.error:
            log.error("live push failed, nginx keeps its current members; retrying with backoff: %s", exc)
        self.error = str(exc)
        self.retry_at = self.backoff.failed(self.clock())

    async def push_or_schedule(self, reason: str = "") -> list[str]:
        """Push now; on failure, remember the error and schedule a retry (never raises)."""
        try:
            names = await self.push()
        except PartialPush as exc:
            self.on_pushed(len(exc.pushed))
            self.failed(exc)
            return exc.pushed
        except LivePushError as exc:
            self.failed(exc)
            return []
        if names and reason:
            log.info("re-pushed live members (%s): %s", reason, ", ".join(names))
        self.on_pushed(len(names))
        self.pushed()
        return names

    def next_deadline(self) -> float | None:
        """A retry, or the next look at nginx's workers (due at once until the first one)."""
        check_at = self.check_at if self.check_at is not None else 0.0  # never looked: due since always
        return check_at if self.retry_at is None else min(self.retry_at, check_at)

    async def on_timer(self, now: float) -> list[str]:
        """Retry a failed push when due; every CHECK_INTERVAL, re-push if nginx has new workers."""
        pushed: list[str] = []
        if self.retry_at is not None and now >= self.retry_at:
            pushed += await self.push_or_schedule("retry after a failed push")
        if self.check_at is None or now >= self.check_at:
            self.check_at = now + CHECK_INTERVAL
            generation = self.reloader.worker_pids()
            if generation and generation != self.generation:
                self.nginx_reloaded()
                pushed += await self.push_or_schedule("nginx has new workers")
            if generation:
                await self.refresh_passive()
        return pushed

    async def refresh_passive(self) -> None:
        """Ask nginx what it serves: members changed behind confpy's back (drift) are logged, counted
        and restored; members its balancer paused after failures are noted (logged when it changes)."""
        try:
            served = await self.admin.upstreams()
        except LivePushError as exc:
            log.debug("could not read nginx's members for drift and passive health: %s", exc)
            return
        drifted = self.drift(served)
        if drifted:
            # Push what differs, from what nginx really serves; a drifted upstream always (its
            # version may be confpy's own, copied by whoever changed its members).
            self.known = {
                name: None if name in drifted else str(entry.get("version"))
                for name, entry in served.items()
                if isinstance(entry, dict)
            }
            if self._dirty is not None:
                self._dirty.update(drifted)  # the push walks only what changed: these did, in nginx
            await self.push_or_schedule("restoring members changed behind confpy's back")
        if served is self._passive_of:
            unavailable = self.unavailable  # the very answer as last time (see LiveAdmin._request)
        else:
            unavailable = passive_unavailable(served)
            self._passive_of = served
        for name, members in unavailable.items():
            for member in sorted(set(members) - set(self.unavailable.get(name, {}))):
                log.warning(
                    "nginx paused %s of upstream %s after failed requests (passive health); %s still says passing",
                    member,
                    name,
                    self.registry.name,
                )
        self.unavailable = unavailable
        self.on_unavailable(unavailable)

    def drift(self, served: Mapping[str, Any]) -> list[str]:
        """Upstreams whose members in nginx are not the ones confpy pushed (a `+manual` or foreign version)."""
        drifted: list[str] = []
        if self.error or self.retry_at is not None:
            return drifted  # confpy's own push is pending: nginx is expected to differ
        for name, wanted in sorted(self.wanted.items()):
            entry = served.get(name)
            version = entry.get("version") if isinstance(entry, dict) else None
            if version is None:
                continue
            members = entry.get("members") if isinstance(entry, dict) else None
            count = len(members) if isinstance(members, list) else 0
            if version == wanted.version:
                # The version is only a label a client sends: someone holding the token can send
                # confpy's own with other members. The members themselves must match too.
                if served_members(members) == wanted_members(wanted):
                    continue
                why = f"confpy's version {version} but {count} other members"
            else:
                why = f"version {version} ({count} members), not the {wanted.version} confpy pushed"
            log.warning(
                "drift: upstream %s in nginx has %s; someone changed it through the admin API (see nginx's error "
                "log); restoring",
                name,
                why,
            )
            self.drift_events[name] = self.clock_wall()
            self.on_drift(name)
            drifted.append(name)
        return drifted

    def status(self) -> LiveStatus:
        return LiveStatus(self.error, dict(self.wanted), self.unavailable, dict(self.drift_events))

    async def close(self) -> None:
        await self.admin.close()
