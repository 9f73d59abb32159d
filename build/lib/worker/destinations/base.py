"""The destination client interface: batches of identify calls in, per-item rejections out.

(`models.Destination` is the stored destination; a `DestinationClient` talks to it.)
"""

from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

from worker.payloads import AudienceRef


@dataclass(frozen=True, slots=True)
class Rejection:
    """One call of a batch the destination did not accept (by its index in the batch)."""

    index: int
    status: int | None
    message: str


class DestinationClient(ABC):
    """A destination client. `deliver` either returns the rejected items (all others were
    accepted), or raises: DestinationAuthError stops the run, TransientDestinationError
    (after its own retries) fails it; in both cases no item of the batch counts as accepted.
    """

    # How many calls the service hands over at once (the destination may split further).
    max_batch_items: ClassVar[int] = 500

    def __init__(self, name: str) -> None:
        self.name = name

    def prepare(self, audience: AudienceRef) -> str | None:
        """Make the destination ready for the audience; return its destination-side field id
        (stored and passed back as `audience.field_id`), or None when the type has none."""
        return audience.field_id

    @abstractmethod
    def deliver(self, audience: AudienceRef, calls: Sequence[dict[str, Any]]) -> list[Rejection]:
        """Send Segment-spec identify calls; return the rejected ones."""

    def check(self) -> str:
        """Check the credentials with the cheapest call; return a short description."""
        return "ok"

    def close(self) -> None:  # noqa: B027 - optional hook
        """Release connections."""

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.name!r}>"
