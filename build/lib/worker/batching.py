"""Splitting calls into requests bounded by item count and encoded size."""

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass


def batch_bounds(
    sizes: Sequence[int], *, max_items: int, max_bytes: int, overhead: int = 0, separator: int = 1
) -> Iterator[range]:
    """Yield index ranges over items of the given encoded sizes so that each range has at most
    `max_items` items and `overhead + sum(sizes) + separators` at most `max_bytes`.

    An item too large to fit even alone gets a range of its own; the caller decides what to
    do with it (the destinations reject it as a per-user failure).
    """
    if max_items < 1:
        raise ValueError("max_items must be at least 1")
    start = 0
    used = overhead
    for index, size in enumerate(sizes):
        count = index - start
        extra = size + (separator if count else 0)
        if count and (count >= max_items or used + extra > max_bytes):
            yield range(start, index)
            start, used = index, overhead + size
        else:
            used += extra
    if start < len(sizes):
        yield range(start, len(sizes))


@dataclass(frozen=True, slots=True)
class EncodedBatch:
    """One request's worth of encoded items, with their positions in the input."""

    indexes: list[int]
    parts: list[bytes]

    def join(self, head: bytes, tail: bytes) -> bytes:
        """The request body: the items comma-separated between `head` and `tail`."""
        return head + b",".join(self.parts) + tail


def encoded_batches(
    items: Sequence[bytes | str],
    *,
    max_items: int,
    max_bytes: int,
    max_item_bytes: int,
    overhead: int,
    too_large: Callable[[int], str],
) -> tuple[list[tuple[int, str]], list[EncodedBatch]]:
    """Cut encoded items into request batches (see `batch_bounds`).

    Each item is its encoding, or the reason it cannot be sent. Returns the items that cannot
    be sent, as (position, reason), including those over `max_item_bytes` (reason from
    `too_large(size)`), and the batches of the rest.
    """
    unsendable: list[tuple[int, str]] = []
    indexes: list[int] = []
    parts: list[bytes] = []
    for index, item in enumerate(items):
        if isinstance(item, str):
            unsendable.append((index, item))
        elif len(item) > max_item_bytes:
            unsendable.append((index, too_large(len(item))))
        else:
            indexes.append(index)
            parts.append(item)
    batches = [
        EncodedBatch([indexes[i] for i in bounds], [parts[i] for i in bounds])
        for bounds in batch_bounds(
            [len(part) for part in parts],
            max_items=max_items,
            max_bytes=max_bytes,
            overhead=overhead,
        )
    ]
    return unsendable, batches
