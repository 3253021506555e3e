"""Registries: what templates ask for (query kinds) and the clients that answer them."""
