"""HTTP/1.1 on the daemon's event loop: asyncio streams, framed by h11 (a pooled client, a small server)."""
