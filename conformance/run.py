"""`make conformance`: py-consul's own test suite against `confpy dev-consul`.

Downloads py-consul's source distribution (a pinned version) with pip, replaces its root
conftest.py by `conformance/conftest.py` (dev-consul instead of a Consul container: the only change
to the suite), runs the in-scope tests and prints how many pass, plus the out-of-scope groups with
the reason for each. `--min-pass N` fails the run when fewer than N in-scope tests pass, so
dev-consul's fidelity cannot regress unnoticed.

    python conformance/run.py [--min-pass N] [--work DIR]
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tarfile
import xml.etree.ElementTree as ET
from pathlib import Path

PY_CONSUL = "py-consul==1.8.0"
HERE = Path(__file__).resolve().parent
ROOT = HERE.parent

# In scope: what dev-consul implements (agent services and checks, health, catalog, KV, status).
IN_SCOPE = [
    "tests/api/test_agent.py",
    "tests/api/test_catalog.py",
    "tests/api/test_health.py",
    "tests/api/test_kv.py",
    "tests/api/test_status.py",
    "tests/api/test_coordinates.py",
    "tests/test_aio.py",
]
# Tests in those files that exercise what is out of scope.
OUT_OF_SCOPE_TESTS = {
    "test_transaction": "transactions (txn)",
    "test_session": "sessions",
    "test_kv_acquire_release": "sessions (KV locks)",
    "test_agent_token_permission_denied": "ACLs",
    "connect": "Connect (sidecars, mesh)",
    "ingress": "gateways",
    "gateway": "gateways",
    "kind_proxy": "Connect proxies",
}
# Out of scope, by file, with the reason (dev-consul is a single-node development agent).
OUT_OF_SCOPE = {
    "test_acl.py, test_acl_templated_policy.py": "ACLs: dev-consul has no ACL system",
    "test_connect.py, test_config.py, test_discovery_chain.py": "Connect, config entries, discovery chains",
    "test_operator.py": "operator: raft, autopilot, keyring (no raft here)",
    "test_event.py": "user events (no gossip)",
    "test_session.py": "sessions",
    "test_snapshot.py": "snapshots (no persistence)",
    "test_txn.py": "transactions",
    "test_query.py": "prepared queries (and its class, `testQuery`, is not collected by pytest)",
}


def fetch(work: Path) -> Path:
    """py-consul's sdist, downloaded once into `work` and extracted; its folder."""
    work.mkdir(parents=True, exist_ok=True)
    archives = list(work.glob("py_consul-*.tar.gz"))
    if not archives:
        subprocess.run(
            [
                sys.executable,
                "-m",
                "pip",
                "download",
                "-q",
                "--no-binary",
                ":all:",
                "--no-deps",
                PY_CONSUL,
                "-d",
                str(work),
            ],
            check=True,
        )
        archives = list(work.glob("py_consul-*.tar.gz"))
    source = work / archives[0].name.removesuffix(".tar.gz")
    if not source.exists():
        with tarfile.open(archives[0]) as archive:
            archive.extractall(work, filter="data")
    shutil.copy(HERE / "conftest.py", source / "conftest.py")
    return source


def run(source: Path) -> tuple[list[str], list[tuple[str, str]], list[str]]:
    """Run the in-scope files; (passed, failed with the first line of the failure, out-of-scope skipped)."""
    report = source / "report.xml"
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pytest",
            "-q",
            "-p",
            "no:cacheprovider",
            "-o",
            "asyncio_mode=auto",
            "-o",
            "addopts=",
            "--timeout=60",
            f"--junitxml={report}",
            *IN_SCOPE,
        ],
        cwd=source,
        check=False,
        capture_output=True,
        text=True,
    )
    passed, failed, skipped = [], [], []
    for case in ET.parse(report).getroot().iter("testcase"):  # noqa: S314 - the report pytest just wrote
        name = f"{case.get('classname', '').rsplit('.', 1)[-1]}.{case.get('name')}"
        if any(key in (case.get("name") or "") for key in OUT_OF_SCOPE_TESTS):
            skipped.append(name)
            continue
        problem = case.find("failure")
        if problem is None:
            problem = case.find("error")
        if problem is not None:
            failed.append(
                (name, (problem.get("message") or "").splitlines()[0][:160] if problem.get("message") else "")
            )
        elif (skip := case.find("skipped")) is not None:
            # The suite's own skips: its ACL fixtures (conftest.py) need an agent with ACLs enabled.
            skipped.append(f"{name} [skipped: {(skip.get('message') or '').splitlines()[0][:80]}]")
        else:
            passed.append(name)
    return passed, failed, skipped


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--min-pass", type=int, default=0, help="fail when fewer in-scope tests pass")
    parser.add_argument("--work", type=Path, default=ROOT / "build" / "conformance")
    args = parser.parse_args()
    passed, failed, skipped = run(fetch(args.work))
    total = len(passed) + len(failed)
    print(f"py-consul ({PY_CONSUL}) against confpy dev-consul: {len(passed)} of {total} in-scope tests pass")
    for name, why in failed:
        print(f"  FAILED {name}: {why}")
    print("out of scope (not run or not counted):")
    for name in skipped:
        reason = next((why for key, why in OUT_OF_SCOPE_TESTS.items() if key in name), "ACLs")
        print(f"  {name}: {reason}")
    for files, why in OUT_OF_SCOPE.items():
        print(f"  {files}: {why}")
    if len(passed) < args.min_pass:
        print(f"conformance regressed: {len(passed)} in-scope tests pass, at least {args.min_pass} did before")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
