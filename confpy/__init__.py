"""confpy: keep nginx upstreams in step with the services registered in Consul."""

__version__ = "0.1.0"
