"""The errors confpy reports to its users.

Every error carries a message that names the file, key, service or command involved and says
what to fix; the CLI prints it on one line and maps the class to an exit code.
"""

from __future__ import annotations


class ConfpyError(Exception):
    """Base of every error confpy reports to an operator."""

    exit_code = 1

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message

    def __str__(self) -> str:
        return self.message


class ConfigError(ConfpyError):
    """The configuration file, the environment or a command-line value is wrong: exit 2.

    It may carry several problems, all found in one read; each is one line.
    """

    exit_code = 2

    def __init__(self, problems: str | list[str]) -> None:
        self.problems = [problems] if isinstance(problems, str) else list(problems)
        super().__init__("\n".join(self.problems))


class RegistryError(ConfpyError):
    """The registry could not be reached, refused the request or sent an unusable answer."""


class ConsulError(RegistryError):
    """Consul could not be reached, refused the request or sent an unusable answer."""


class ConsulUnreachable(ConsulError):
    """No connection, a timeout or a dropped connection: worth retrying."""


class ConsulBadResponse(ConsulError):
    """Consul answered, but with an error status or a body confpy cannot use."""

    def __init__(self, message: str, status: int | None = None, body: str = "") -> None:
        super().__init__(message)
        self.status = status
        self.body = body


class RenderError(ConfpyError):
    """A template failed to load or render; the message names file:line."""


class UnsafeValueError(RenderError):
    """A registry value would break out of an nginx directive; `value` is the refused text."""

    def __init__(self, message: str, value: str | None = None) -> None:
        super().__init__(message)
        self.value = value


class InstallError(ConfpyError):
    """A destination could not be written; the previous file is intact."""


class LockError(ConfpyError):
    """Another confpy process holds the lock on a destination."""


class CheckError(ConfpyError):
    """The nginx configuration check failed; the message carries nginx's own words."""


class ReloadError(ConfpyError):
    """nginx could not be reloaded."""
