"""Talking to Consul: the client, the query kinds (dependencies) and the blocking-query watcher."""
