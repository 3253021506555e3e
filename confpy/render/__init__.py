"""Rendering: the values templates see, and the Jinja2 environment that renders them."""
