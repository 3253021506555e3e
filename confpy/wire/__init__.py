"""HTTP/1.1 on the daemon's event loop: asyncio streams (a pooled client parsed by httptools, a small h11 server)."""
