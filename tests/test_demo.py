"""The demo runs end to end and writes exactly the calls its history reports."""

import io
from pathlib import Path

from rich.console import Console

from worker.demo import run_demo
from worker.testing.factories import destination_state, read_calls


def test_demo_syncs_initial_then_incremental(tmp_path: Path) -> None:
    output = io.StringIO()
    summaries = run_demo(tmp_path / "demo", Console(file=output, width=80))
    assert [s.status for s in summaries] == ["succeeded"] * 8
    assert [s.mode for s in summaries] == ["initial"] * 4 + ["incremental"] * 4
    calls = read_calls(tmp_path / "demo" / "identify.ndjson")
    assert len(calls) == sum(s.sent for s in summaries)
    initial, incremental = summaries[:4], summaries[4:]
    # The rule audience moves with the new and aged events too.
    rules = next(s for s in incremental if s.audience_key == "repeat_buyers_30d")
    assert rules.members > 0 and rules.entered > 0 and rules.exited > 0
    assert all(s.sent == s.members for s in initial)
    assert 0 < sum(s.sent for s in incremental) < sum(s.sent for s in initial)
    for summary in incremental:
        # The destination ends holding exactly the audience's current members as `true`.
        state = destination_state(calls, summary.audience_key)
        assert sum(state.values()) == summary.members
    printed = output.getvalue()
    assert "order_completed_last_30days" in printed and "incremental" in printed
