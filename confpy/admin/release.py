"""`confpy upstream release SERVICE`: apply a drop the shrink guard holds, at once, on every gateway.

The daemon has no control channel but signals (and SIGHUP means "re-read the configuration"), so
the registry is the channel: this writes the release key (guard.py: `confpy/guard/release` in
Consul's KV, `<prefix>.confpy-guard-release` in etcd), a JSON object {service: stamp}, which every
confpy watches; each one holding a drop of SERVICE applies it when the stamp changes, and logs it.
"""

from __future__ import annotations

import os
import socket
import time

from confpy.admin.common import AdminContext
from confpy.errors import ConfigError
from confpy.guard import release_key, with_release
from confpy.model import KVPair
from confpy.registry.consul import ConsulClient
from confpy.registry.etcd import EtcdClient


def release_stamp() -> str:
    """What a release is told apart by: when, and from where (a second release is a new stamp)."""
    return f"{time.strftime('%Y-%m-%dT%H:%M:%SZ', time.gmtime())} {socket.gethostname()} pid {os.getpid()}"


def check_service(service: str) -> str:
    if not service or "/" in service or not service.isprintable():
        raise ConfigError(f"upstream release {service!r}: give a service name (no `/`, no control characters)")
    return service


async def release(context: AdminContext, service: str) -> int:
    """Write the release key of `context`'s registry for `service`."""
    check_service(service)
    key = release_key(context.etcd)
    stamp = release_stamp()
    if context.etcd is not None:
        etcd = EtcdClient(context.etcd)
        try:
            _, pairs = await etcd.range(key, prefix=False)
            current = next((KVPair(k, k, v) for k, v in pairs if k == key), None)
            await etcd.put(key, with_release(current, service, stamp))
        finally:
            await etcd.close()
        where = f"etcd key {key!r}"
    else:
        consul = ConsulClient(context.consul)
        try:
            await consul.put_key(key, with_release(await consul.read_key(key), service, stamp))
        finally:
            await consul.close()
        where = f"Consul KV key {key!r}"
    print(
        f"released service {service}: wrote {where} ({stamp}); every confpy holding a drop of {service} applies it now"
    )
    return 0
