"""deploy/prometheus-alerts.yml: a rules file Prometheus accepts (checked here by its
shape, as `promtool check rules` would, since promtool is not always at hand), whose rules
name only metrics the service exports."""

import re
from datetime import UTC, datetime
from pathlib import Path

import yaml

from worker.metrics import metric_families
from worker.reports import MetricsReport, PairMetrics

RULES = Path(__file__).resolve().parent.parent / "deploy" / "prometheus-alerts.yml"
DURATION = re.compile(r"^\d+[smhdwy]$")
METRIC = re.compile(r"\baudience_sync_[a-z_]+\b")


def _exported_names() -> set[str]:
    report = MetricsReport(
        pairs=(
            PairMetrics(
                audience="a",
                destination="d",
                last_success_at=datetime(2026, 1, 1, tzinfo=UTC),
                last_status="failed",
                last_duration_seconds=1.0,
                runs={"failed": 1},
                calls_sent=0,
                calls_failed=0,
                quarantined=0,
                owed=0,
            ),
        ),
        members={"a": 1},
    )
    names: set[str] = set()
    for family in metric_families(report):
        names.add(family.name)
        names.update(sample.name for sample in family.samples)
    return names


def test_rules_file_has_the_three_example_rules() -> None:
    document = yaml.safe_load(RULES.read_text())
    assert set(document) == {"groups"}
    [group] = document["groups"]
    assert set(group) == {"name", "rules"}
    rules = group["rules"]
    assert [rule["alert"] for rule in rules] == [
        "AudienceSyncStale",
        "AudienceSyncFailing",
        "AudienceSyncQuarantineGrowing",
    ]
    exported = _exported_names()
    for rule in rules:
        assert set(rule) <= {"alert", "expr", "for", "labels", "annotations"}
        assert isinstance(rule["expr"], str) and rule["expr"].strip()
        assert DURATION.match(rule["for"])
        assert rule["labels"]["severity"] in {"warning", "critical"}
        assert rule["annotations"]["summary"]
        assert rule["expr"].count("(") == rule["expr"].count(")")
        used = set(METRIC.findall(rule["expr"]))
        assert used and used <= exported, used - exported
