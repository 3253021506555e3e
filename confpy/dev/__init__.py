"""Development tools, apart from the runtime: `devconsul` (`confpy dev-consul`, an in-memory
Consul-compatible agent), `lab` (the loopback world of backends, nginx and confpy processes that the
demo, the tests and the benchmarks build) and `demo` (`confpy demo`).

No runtime module imports this package (tests/test_layering.py holds that); the CLI reaches it
through imports inside the functions that run those commands.
"""
