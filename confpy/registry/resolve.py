"""Host names in a registry's answer, resolved off the loop when it is fetched: an instance whose
name does not resolve is left out (nginx refuses a whole configuration over one such name), and
the others carry their address (`ServiceInstance.ip`), which live mode pushes without resolving
again. Both registry clients use it, so an etcd member at `x.invalid:80` is left out as a Consul
one is."""

from __future__ import annotations

import asyncio
import socket

from confpy.model import HealthView, is_hostname, with_resolved


async def resolve_hosts(hosts: set[str], timeout: float) -> dict[str, str]:
    """Each host name the system resolver knows (as nginx will need it to), with its first address."""
    loop = asyncio.get_running_loop()

    async def one(host: str) -> tuple[str, str] | None:
        try:
            async with asyncio.timeout(timeout):
                found = await loop.getaddrinfo(host, None, type=socket.SOCK_STREAM)
        except (OSError, UnicodeError, TimeoutError):
            return None
        return (host, str(found[0][4][0])) if found else None

    answers = await asyncio.gather(*(one(h) for h in sorted(hosts)))
    return dict(answer for answer in answers if answer is not None)


async def resolved_view(view: HealthView, timeout: float) -> HealthView:
    """`view` without its instances whose host name does not resolve; the others carry their address."""
    hosts = {i.address for i in view.instances if is_hostname(i.address)}
    if not hosts:
        return view
    return with_resolved(view, await resolve_hosts(hosts, timeout))
