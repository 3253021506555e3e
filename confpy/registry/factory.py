"""The registry a configuration names: Consul (the default) or etcd."""

from __future__ import annotations

from confpy.config import Config
from confpy.registry.base import Registry
from confpy.registry.consul import ConsulClient, ConsulRegistry
from confpy.registry.etcd import EtcdClient, EtcdRegistry


def open_registry(config: Config) -> Registry:
    if config.etcd is not None:
        return EtcdRegistry(EtcdClient(config.etcd))
    return ConsulRegistry(ConsulClient(config.consul))
