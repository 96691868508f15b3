"""The error hierarchy: every failure gradshard raises is a :class:`GradshardError`."""

from __future__ import annotations


class GradshardError(Exception):
    """Base of every error gradshard raises on purpose."""


class LayoutError(GradshardError, ValueError):
    """A model layout, state dict or flat vector does not fit together."""


class PlanError(GradshardError, ValueError):
    """A shard plan or topology cannot be built from the given parameters."""


class StoreError(GradshardError):
    """An object store operation failed."""


class ObjectNotFoundError(StoreError, KeyError):
    """The named object does not exist in the store."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0]) if self.args else "object not found"


class UnsafeObjectError(StoreError):
    """A store entry is not a regular file inside the store (a symbolic link, a FIFO, a socket, a device, or under
    a symlinked directory); it was refused without being opened or read."""


class UpdateError(GradshardError, ValueError):
    """A client update is invalid. ``client`` names whose update it is; ``reason`` says what is wrong."""

    def __init__(self, client: str, reason: str) -> None:
        super().__init__(f"update of client {client!r} rejected: {reason}")
        self.client = client
        self.reason = reason


class BadUpdatesError(UpdateError):
    """Several client updates of one function's range are invalid: ``clients`` maps each to its reason (the first
    one is also ``client`` / ``reason``), so the driver rejects all of them at once and reruns the round once."""

    def __init__(self, clients: dict[str, str]) -> None:
        first, reason = next(iter(clients.items()))
        super().__init__(first, reason)
        self.clients = dict(clients)
        others = f" (and {len(clients) - 1} more: {', '.join(list(clients)[1:6])})" if len(clients) > 1 else ""
        self.args = (f"update of client {first!r} rejected: {reason}{others}",)


class SecurityError(GradshardError):
    """A key, a key file or the key registry cannot be used as it is (malformed, too large, unknown, revoked)."""


class KeyRejectedError(SecurityError):
    """The registry refuses a key for a client; ``reason`` says why (unregistered, revoked, another client's)."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class SignatureError(SecurityError):
    """A signature cannot be made or does not verify (forged, altered, or over a non-cryptographic digest)."""


class RoundError(GradshardError):
    """A round cannot be aggregated (too few valid updates, policy 'fail' met a bad update, ...)."""


class TrainingError(GradshardError):
    """A training run cannot go on: every client of a round failed, or no round aggregated any update."""


class PrivacyError(GradshardError):
    """Differential privacy settings or a privacy ledger that cannot be used as they are."""


class PrivacyBudgetError(PrivacyError):
    """A release would take the privacy loss past ``max_epsilon``; it was refused before any noise was drawn."""


class InvocationError(GradshardError):
    """A function invocation failed; the message names the invocation and the cause."""


class MemoryLimitError(InvocationError):
    """An invocation used more memory than its cap."""


class InvocationTimeoutError(InvocationError):
    """An invocation ran longer than its timeout."""


class MissingExtraError(GradshardError, ImportError):
    """A feature needs an optional extra that is not installed; the message names the ``pip install`` to run.

    ``extra`` is the extra's name (``"train"``), ``feature`` what needed it, ``missing`` the modules not found.
    """

    def __init__(self, message: str, *, extra: str, feature: str, missing: tuple[str, ...]) -> None:
        super().__init__(message, name=missing[0] if missing else None)
        self.extra = extra
        self.feature = feature
        self.missing = missing


class TokenError(GradshardError):
    """A function refused its invocation token; the subclass names the check that failed
    (:mod:`gradshard.security.tokens`). Never retried with the same token."""
