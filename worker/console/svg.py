"""Charts as server-rendered SVG: pure functions from numbers to markup (nothing is
loaded by the browser). Only numbers and escaped text go into the markup."""

from collections.abc import Sequence
from html import escape

from markupsafe import Markup


def _scale(values: Sequence[int], height: float, pad: float) -> tuple[float, float]:
    low, high = min(values), max(values)
    span = high - low or 1
    return low, (height - 2 * pad) / span


def sparkline(values: Sequence[int], *, width: int = 120, height: int = 24) -> Markup:
    """A line through the values, oldest left; empty for no values."""
    if not values:
        return Markup("")
    pad = 2.0
    low, unit = _scale(values, height, pad)
    step = (width - 2 * pad) / max(len(values) - 1, 1)
    points = " ".join(
        f"{pad + i * step:.1f},{height - pad - (v - low) * unit:.1f}" for i, v in enumerate(values)
    )
    title = escape(f"members at the latest {len(values)} runs: {', '.join(map(str, values))}")
    return Markup(
        f'<svg class="spark" width="{width}" height="{height}" viewBox="0 0 {width} {height}" '
        f'role="img"><title>{title}</title>'
        f'<polyline fill="none" stroke="currentColor" stroke-width="1.5" points="{points}"/>'
        "</svg>"
    )


def run_chart(
    members: Sequence[int],
    entered: Sequence[int],
    exited: Sequence[int],
    *,
    width: int = 720,
    height: int = 200,
) -> Markup:
    """Members as a line, entered (up) and exited (down) as bars, one slot per run, oldest
    left."""
    count = len(members)
    if count == 0:
        return Markup("")
    pad, axis = 24.0, height / 2
    slot = (width - 2 * pad) / count
    top_members = max(max(members), 1)
    top_moves = max(max(entered, default=0), max(exited, default=0), 1)
    half = axis - pad
    parts = [
        f'<svg class="chart" width="{width}" height="{height}" viewBox="0 0 {width} {height}" '
        'role="img"><title>members (line), entered (green) and exited (red) per run</title>',
        f'<line x1="{pad}" y1="{axis}" x2="{width - pad}" y2="{axis}" stroke="#bbb"/>',
    ]
    for i in range(count):
        x = pad + i * slot + slot * 0.2
        bar = slot * 0.6
        up = entered[i] / top_moves * half
        down = exited[i] / top_moves * half
        parts.append(
            f'<rect class="entered" x="{x:.1f}" y="{axis - up:.1f}" width="{bar:.1f}" '
            f'height="{up:.1f}" fill="#4caf50"><title>entered {entered[i]}</title></rect>'
        )
        parts.append(
            f'<rect class="exited" x="{x:.1f}" y="{axis:.1f}" width="{bar:.1f}" '
            f'height="{down:.1f}" fill="#e57373"><title>exited {exited[i]}</title></rect>'
        )
    points = " ".join(
        f"{pad + (i + 0.5) * slot:.1f},{height - pad - m / top_members * (height - 2 * pad):.1f}"
        for i, m in enumerate(members)
    )
    parts.append(
        f'<polyline class="members" fill="none" stroke="#1565c0" stroke-width="2" '
        f'points="{points}"/>'
    )
    parts.append(
        f'<text x="{pad}" y="14" font-size="11" fill="#1565c0">members (max {top_members})'
        "</text></svg>"
    )
    return Markup("".join(parts))
