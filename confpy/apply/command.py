"""Running an external command (`nginx -t`, `reload_cmd`) from the event loop, bounded in time.

On Linux the child is watched through a pidfd and its output read from a plain pipe, both
registered with the loop directly: its exit is seen in the loop's next turn, not after the
chain of transports, protocols and child-watcher callbacks that `asyncio.create_subprocess_exec`
goes through (several turns, each of which may run other work first; `nginx -t` sits on the path
of every change). Where pidfds are missing (Linux before 5.3, a seccomp filter that refuses
them), asyncio's own subprocess support does the same job.
"""

from __future__ import annotations

import asyncio
import functools
import os
import signal
import subprocess
from collections.abc import Callable, Mapping, Sequence
from typing import Protocol

# Secrets confpy reads from its environment that no child (`nginx -t`, a reload_cmd) needs: a
# reload script that logs its environment, or a core dump of nginx, must not carry them.
# (Addresses and CA paths are not secrets, but they are the registry's business, not nginx's: the
# whole CONSUL_HTTP_* and ETCDCTL_* families go.)
SECRET_VARIABLES = ("CONSUL_CLIENT_KEY", "CONSUL_CLIENT_CERT")
SECRET_PREFIXES = ("CONSUL_HTTP_", "ETCDCTL_")


def child_environment(environ: Mapping[str, str] | None = None) -> dict[str, str]:
    """`environ` (confpy's own by default) without the registry's credentials."""
    source = os.environ if environ is None else environ
    return {
        name: value
        for name, value in source.items()
        if name not in SECRET_VARIABLES and not name.startswith(SECRET_PREFIXES)
    }


# How long to wait for a killed child to go: SIGKILL takes effect at once, unless the child is
# stuck in the kernel (a hung NFS mount); then it is left to be reaped later, not waited for.
KILL_WAIT = 2.0


@functools.cache
def pidfds_work() -> bool:
    """True when this kernel (and any seccomp filter) lets confpy open pidfds."""
    try:
        os.close(os.pidfd_open(os.getpid()))
    except (AttributeError, OSError):
        return False
    return True


async def run(cmd: Sequence[str], timeout: float, meanwhile: Callable[[], None] | None = None) -> tuple[int, str]:
    """Run `cmd` (no shell; stdin empty, stdout and stderr in one pipe); (exit status, output).

    `meanwhile` runs once the command has started, while it runs; should it raise, the command is
    killed and the exception propagates. Cancelling the caller kills the command too, so a
    stopping daemon never waits for it. FileNotFoundError/PermissionError when it cannot start,
    TimeoutError (after killing it) when it runs longer than `timeout`.
    """
    if pidfds_work():
        child: _Child = _PidfdChild(cmd)
    else:
        child = await _AsyncioChild.start(cmd)
    try:
        if meanwhile is not None:
            meanwhile()
        async with asyncio.timeout(timeout):
            status, output = await child.finished()
    except BaseException:  # timed out, cancelled (stopping), or `meanwhile` failed: it must not outlive us
        await child.kill()
        raise
    return status, output.decode("utf-8", "replace")


class _Child(Protocol):
    async def finished(self) -> tuple[int, bytes]:
        """Wait for the exit; (exit status, everything it wrote)."""

    async def kill(self) -> None:
        """SIGKILL it (if it still runs) and reap it, waiting at most KILL_WAIT."""


class _PidfdChild:
    """A child whose exit the loop sees through a pidfd, its output drained as it comes."""

    def __init__(self, cmd: Sequence[str]) -> None:
        self.loop = asyncio.get_running_loop()
        self.output = bytearray()
        self.exited: asyncio.Future[None] = self.loop.create_future()
        read_end, write_end = os.pipe2(os.O_CLOEXEC)
        try:
            self.proc = subprocess.Popen(
                list(cmd),
                stdin=subprocess.DEVNULL,
                stdout=write_end,
                stderr=subprocess.STDOUT,
                env=child_environment(),
            )
        except BaseException:
            os.close(read_end)
            raise
        finally:
            os.close(write_end)
        self.pipe = read_end
        os.set_blocking(self.pipe, False)
        try:
            self.pidfd = os.pidfd_open(self.proc.pid)
        except OSError:  # cannot happen for our own unreaped child; never leave it running
            self.proc.kill()
            self.proc.wait()
            os.close(self.pipe)
            raise
        # Drained while it runs: a command that writes more than a pipe holds would block forever.
        self.loop.add_reader(self.pipe, self._drain)
        self.loop.add_reader(self.pidfd, self._exited)
        self.closed = False

    def _drain(self) -> None:
        while True:
            try:
                data = os.read(self.pipe, 65536)
            except BlockingIOError:
                return
            if not data:  # every writer is gone; the exit itself comes through the pidfd
                self.loop.remove_reader(self.pipe)
                return
            self.output += data

    def _exited(self) -> None:
        self.loop.remove_reader(self.pidfd)
        if not self.exited.done():
            self.exited.set_result(None)

    async def finished(self) -> tuple[int, bytes]:
        await asyncio.shield(self.exited)  # a cancelled wait must leave `exited` to `kill`
        # Whatever it wrote before exiting is in the pipe now. A grandchild may still hold the
        # pipe open (a reload_cmd that starts a daemon): what is there is the output, no EOF wait.
        self._drain()
        status = self.proc.wait()  # exited: reaps at once
        self._close()
        return status, bytes(self.output)

    async def kill(self) -> None:
        try:
            if not self.exited.done():
                try:
                    signal.pidfd_send_signal(self.pidfd, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                async with asyncio.timeout(KILL_WAIT):
                    await asyncio.shield(self.exited)
            self.proc.wait()
        except TimeoutError:
            pass  # stuck in the kernel: subprocess reaps it once it is gone
        finally:
            self._close()

    def _close(self) -> None:
        if self.closed:
            return
        self.closed = True
        self.loop.remove_reader(self.pipe)
        self.loop.remove_reader(self.pidfd)
        os.close(self.pipe)
        os.close(self.pidfd)


class _AsyncioChild:
    """The same through asyncio's subprocess support (no pidfds here)."""

    def __init__(self, proc: asyncio.subprocess.Process) -> None:
        self.proc = proc

    @classmethod
    async def start(cls, cmd: Sequence[str]) -> _AsyncioChild:
        proc = await asyncio.create_subprocess_exec(
            *cmd,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
            env=child_environment(),
        )
        return cls(proc)

    async def finished(self) -> tuple[int, bytes]:
        stdout, _ = await self.proc.communicate()
        assert self.proc.returncode is not None  # communicate() waits for the exit
        return self.proc.returncode, stdout

    async def kill(self) -> None:
        if self.proc.returncode is None:
            try:
                self.proc.kill()
            except ProcessLookupError:
                pass
        try:
            async with asyncio.timeout(KILL_WAIT):
                await self.proc.wait()
        except TimeoutError:
            pass  # stuck in the kernel: asyncio's child watcher reaps it once it is gone
