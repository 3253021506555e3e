"""Signals: the handlers only queue; a dispatcher task turns them into actions on the loop.

As in gunicorn's arbiter, no work and no logging happen in a handler: SIGHUP becomes an event
for the main task (re-read the configuration), SIGTERM and SIGINT cancel it (stop within 2 s).
"""

from __future__ import annotations

import asyncio
import logging
import signal
from collections.abc import Callable, Coroutine

from confpy.daemon.systemd import SystemdNotifier

log = logging.getLogger(__name__)

HANDLED = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)


async def run_until_stopped(
    main: Coroutine[None, None, None], on_reconfigure: Callable[[], None], notifier: SystemdNotifier
) -> None:
    """Run `main` until it ends or SIGTERM/SIGINT cancels it; SIGHUP calls `on_reconfigure`."""
    loop = asyncio.get_running_loop()
    signals: asyncio.Queue[int] = asyncio.Queue()
    for signum in HANDLED:
        loop.add_signal_handler(signum, signals.put_nowait, signum)
    task = asyncio.create_task(main, name="confpy main")
    stopping: list[bool] = []

    async def dispatch() -> None:
        while True:
            signum = await signals.get()
            if signum == signal.SIGHUP:
                on_reconfigure()
                continue
            log.info("received %s; stopping", signal.Signals(signum).name)
            stopping.append(True)
            notifier.notify("STOPPING=1")
            task.cancel()
            return

    dispatcher = asyncio.create_task(dispatch(), name="confpy signals")
    try:
        await task
    except asyncio.CancelledError:
        if not stopping:
            raise
    finally:
        dispatcher.cancel()
        for signum in HANDLED:
            loop.remove_signal_handler(signum)
        notifier.notify("STOPPING=1")
