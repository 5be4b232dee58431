"""The one exception tree, branched by what failed.

Errors are classified once, where they are caught: an ``ImapAuthError`` is terminal
until an operator acts, an ``ImapTransientError`` is retried with backoff.  Messages
never carry a secret value: pass names and ids, never passwords or tokens.
"""

from __future__ import annotations


class ShardworkerError(Exception):
    """Base of every error shardworker raises on purpose."""


class ConfigError(ShardworkerError):
    """Settings are invalid; the message names the variable."""


class StoreError(ShardworkerError):
    """PostgreSQL failed or holds something unexpected."""


class DatabaseUnavailableError(StoreError):
    """PostgreSQL did not serve a call: no pool connection in time, or the connection failed.

    ``reason`` is ``db_pool_timeout`` (psycopg_pool's PoolTimeout: every connection busy
    or the server unreachable) or ``db_unavailable`` (an OperationalError on the wire).
    A dependency failure, never the mailbox's: the IMAP session is kept.
    """

    def __init__(self, message: str, reason: str = "db_unavailable") -> None:
        super().__init__(message)
        self.reason = reason


class MigrationError(StoreError):
    """The schema could not be brought to the expected version."""


class SchemaMismatchError(MigrationError):
    """Existing (Alga-created) tables lack columns shardworker needs."""


class SecretError(ShardworkerError):
    """A secret could not be stored, found or decrypted."""


class SecretKeyError(SecretError):
    """The key needed for an envelope is missing or wrong; names the key id."""


class SecretNotFoundError(SecretError):
    """No source in the read chain holds the named secret."""


class ImapError(ShardworkerError):
    """Talking to an IMAP server failed."""


class ImapAuthError(ImapError):
    """Credentials were rejected: terminal until someone acts."""

    def __init__(self, message: str, code: str = "auth_failed") -> None:
        super().__init__(message)
        self.code = code


class ImapTransientError(ImapError):
    """Network, timeout or server trouble: retried with backoff."""

    def __init__(self, message: str, reason: str = "network") -> None:
        super().__init__(message)
        self.reason = reason


class ImapProtocolError(ImapTransientError):
    """The server said something we cannot parse or that breaks the protocol."""

    def __init__(self, message: str) -> None:
        super().__init__(message, reason="protocol")


class ImapThrottledError(ImapTransientError):
    """The server asked us to slow down (Exchange's throttling, Gmail's bandwidth limit):
    an honoured backoff of ``retry_after_s``, not a failure to count."""

    def __init__(self, message: str, retry_after_s: float) -> None:
        super().__init__(message, reason="throttled")
        self.retry_after_s = retry_after_s


class NotImapError(ImapTransientError):
    """The peer's first answer is not an IMAP greeting (wrong port, another service)."""

    def __init__(self, message: str) -> None:
        super().__init__(message, reason="not_imap")


class FolderError(ImapError):
    """A folder is missing or cannot be selected; it is parked and re-probed."""


class ParseError(ShardworkerError):
    """A message could not be turned into emailData; it is dead-lettered."""


class PublishError(ShardworkerError):
    """Redis refused or failed a publish."""


class BackpressureError(PublishError):
    """Consumers lag past the bound; fetching stops instead of trimming unread entries."""


class LeaseError(ShardworkerError):
    """A lease operation failed."""


class LeaseLostError(LeaseError):
    """This owner no longer holds the lease; it must stop acting at once."""


class FencedError(LeaseError):
    """A write carried a stale fencing epoch and was rejected atomically."""


class TokenRefreshError(ImapAuthError):
    """The OAuth2 token endpoint refused the refresh token (``invalid_grant``...): terminal."""


class TokenEndpointError(ImapTransientError):
    """The OAuth2 token endpoint failed (5xx, timeout, refused): retried with backoff."""

    def __init__(self, message: str) -> None:
        super().__init__(message, reason="token_endpoint")


class TokenPendingError(ImapTransientError):
    """A token refresh is still running on the refresher's own threads: retry shortly.

    Not a failure: the engine defers the slot by ``retry_s`` without touching its backoff.
    """

    def __init__(self, message: str, retry_s: float) -> None:
        super().__init__(message, reason="token_pending")
        self.retry_s = retry_s


class DependencyUnavailableError(ShardworkerError):
    """PostgreSQL or Redis could not be reached (at boot: retried, then its own exit code)."""


class AdminError(ShardworkerError):
    """An admin operation (CLI or HTTP API) was refused; the message says why."""


class ValidationError(AdminError):
    """A request field is invalid; ``field`` names it."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field


class NotFoundError(AdminError):
    """The provider or command does not exist."""


class ConflictError(AdminError):
    """The operation cannot run in the current state (e.g. nobody owns the provider)."""
