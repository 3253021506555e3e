"""`confpy dev-consul`: an in-memory, single-node, Consul-compatible agent for development and tests.

It follows Consul's documented HTTP API (blocking queries, health, catalog, agent writes, checks,
KV) closely enough that confpy, py-consul and the consul CLI cannot tell the difference for the
endpoints it serves. It has no ACLs, raft, DNS or Connect, and keeps nothing on disk.
"""
