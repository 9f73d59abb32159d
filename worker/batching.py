"""Splitting calls into requests bounded by item count and encoded size."""

from collections.abc import Iterator, Sequence


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
