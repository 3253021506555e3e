"""Watching: one task per dependency, and the set of running watches."""
