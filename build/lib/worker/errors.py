"""The exception tree: configuration (stop, tell the user), source, and destination errors."""


class AudienceSyncError(Exception):
    """Base of every error this project raises on purpose."""


class ConfigError(AudienceSyncError):
    """Bad configuration or usage: nothing was changed; the message says what to fix."""


class NotFoundError(ConfigError):
    """A named audience, destination or run does not exist."""


class SourceError(AudienceSyncError):
    """The audience query failed: nothing is sent and no snapshot is kept."""


class DestinationError(AudienceSyncError):
    """Base of destination failures."""


class TransientDestinationError(DestinationError):
    """Worth retrying (connection errors, timeouts, 429, 5xx); raised once retries ran out."""


class DestinationAuthError(DestinationError):
    """The destination refused the credentials: the run stops at once, with no retries."""

    def __init__(self, destination: str) -> None:
        super().__init__(f"invalid API key for destination {destination}")
        self.destination = destination
