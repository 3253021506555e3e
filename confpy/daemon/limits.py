"""The open-file limit: each watched service holds a connection to the registry.

Under systemd's default soft limit (1024) a gateway with more than about a thousand services
would see its watches fail with EMFILE. At start-up the soft limit is raised to the hard one
(the unit sets `LimitNOFILE=65536`); when the watches outgrow even that, the log says so.
"""

from __future__ import annotations

import logging
import resource

log = logging.getLogger(__name__)

# Besides one connection per watch: the listeners, nginx's admin API, the template observer,
# state files, `nginx -t`'s pipe and pidfd, the journal...
SPARE_FILES = 64


def raise_open_file_limit() -> int:
    """Raise the soft RLIMIT_NOFILE to the hard one; the soft limit in force afterwards."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or soft == resource.RLIM_INFINITY:
        target = hard
    else:
        target = max(soft, hard)
    if target != soft:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        except (ValueError, OSError) as exc:
            log.warning("could not raise the open-file limit from %d to %d: %s", soft, target, exc)
            return soft
        log.info("raised the open-file limit from %d to %d (the hard limit)", soft, target)
        return target
    return soft


class FileBudget:
    """Says (once per shortfall) when the watches need more open files than the limit allows."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self._warned_at = 0

    def check(self, watches: int) -> bool:
        """True when `watches` fit; logs a warning the first time they do not (and again when they grow)."""
        needed = watches + SPARE_FILES
        if self.limit == resource.RLIM_INFINITY or needed <= self.limit:
            return True
        if needed > self._warned_at:
            self._warned_at = needed
            log.warning(
                "%d watches need about %d open files but the limit is %d: watches past it will fail with "
                "'too many open files'; raise it (systemd: LimitNOFILE=65536, as the shipped unit sets)",
                watches,
                needed,
                self.limit,
            )
        return False
