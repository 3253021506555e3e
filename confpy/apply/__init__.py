"""Applying: installing rendered files safely, checking and reloading nginx."""
