"""What ships inside the package: the templates (`builtin:NAME` in a configuration). Found with
importlib.resources, so they work the same from a checkout, an editable install and a wheel in
any virtualenv. (`confpy init`'s example is generated from the keys' declarations: config_doc.py.)"""

from __future__ import annotations

from importlib import resources
from pathlib import Path

BUILTIN_PREFIX = "builtin:"


def _folder(name: str) -> Path:
    return Path(str(resources.files("confpy") / name))


def template_names() -> list[str]:
    """The shipped templates' names."""
    return sorted(p.name for p in _folder("templates").iterdir() if p.suffix == ".j2")


def template_path(name: str) -> Path:
    """The installed file of the shipped template `name`; KeyError (with the choices) if none."""
    if name in template_names():
        return _folder("templates") / name
    raise KeyError(f"no shipped template {name!r}; shipped: {', '.join(template_names())}")


def template_summary(name: str) -> str:
    """The first sentence of a shipped template's leading comment."""
    text = template_path(name).read_text(encoding="utf-8")
    if text.startswith("{#"):
        body = " ".join(text[2 : text.find("#}")].strip("-").split())
        sentence = body.split(". ")[0].rstrip(".:")
        return sentence if len(sentence) <= 90 else sentence.split(": ")[0]
    return ""
