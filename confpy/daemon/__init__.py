"""The daemon: one asyncio loop, its timing, and what operators and supervisors observe."""
