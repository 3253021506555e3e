"""`confpy demo`, the newcomer's first command, runs the whole story and cleans up after itself."""

from __future__ import annotations

import psutil

from .conftest import run_confpy


def test_demo_proves_every_step_and_stops_what_it_started() -> None:
    before = {p.pid for p in psutil.process_iter()}
    proc = run_confpy("demo", timeout=120)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    out = proc.stdout
    for step in (
        "== 1. The gateway round-robins over App server 1, 2 and 3",
        "== 2. Take App server 3 out",
        "== 3. An upstream never loses its last server",
        "refusing to remove",
        "== 4. Put App server 2 and 3 back",
        "== 5. Drain App server 2",
        "== 6. App server 2 dies",
        "How long each change took to reach traffic",
        "demo finished",
    ):
        assert step in out, step
    assert out.count("-> reached traffic") == 8
    leftovers = [
        p
        for p in psutil.process_iter(["pid", "cmdline"])
        if p.info["pid"] not in before and any("confpy" in part or "nginx" in part for part in p.info["cmdline"] or [])
    ]
    assert leftovers == []
