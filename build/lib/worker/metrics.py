"""Prometheus metrics, computed from the state database at each scrape: every Celery
process on every host writes its runs there, so one scrape covers them all without
multiprocess files. Served by the console's `/metrics` and `audience-sync metrics serve`."""

from collections.abc import Iterator
from contextlib import suppress
from wsgiref.simple_server import WSGIRequestHandler, make_server

from prometheus_client import CollectorRegistry, generate_latest, make_wsgi_app
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from worker.domain import RunStatus
from worker.reports import MetricsReport, ReportService

PAIR = ["audience", "destination"]
# Every status a finished run can have: a pair's `last_run_status` has one series each.
STATUSES = [s.value for s in RunStatus]


def metric_families(report: MetricsReport) -> list[Metric]:
    """The metrics of one report (pure: no database, no clock)."""
    last_success = GaugeMetricFamily(
        "audience_sync_last_success_timestamp_seconds",
        "When the pair's last succeeded or partial run ended (Unix time).",
        labels=PAIR,
    )
    last_status = GaugeMetricFamily(
        "audience_sync_last_run_status",
        "1 for the status of the pair's latest run (skipped runs left out), else 0.",
        labels=[*PAIR, "status"],
    )
    members = GaugeMetricFamily(
        "audience_sync_members",
        "Members of the audience at its latest delivered run.",
        labels=["audience"],
    )
    runs = CounterMetricFamily(
        "audience_sync_runs",
        "Runs of the pair by status (all kept history).",
        labels=[*PAIR, "status"],
    )
    sent = CounterMetricFamily(
        "audience_sync_calls_sent", "Identify calls the destination accepted.", labels=PAIR
    )
    failed = CounterMetricFamily(
        "audience_sync_calls_failed", "Identify calls the destination rejected.", labels=PAIR
    )
    quarantined = GaugeMetricFamily(
        "audience_sync_quarantined_users",
        "Users skipped after repeated rejections, until retried by hand.",
        labels=PAIR,
    )
    owed = GaugeMetricFamily(
        "audience_sync_owed_changes",
        "Users whose current value is still owed to the destination (rejected or in doubt).",
        labels=PAIR,
    )
    duration = GaugeMetricFamily(
        "audience_sync_run_duration_seconds",
        "How long the pair's latest finished run took, start to end (phase `total`).",
        labels=[*PAIR, "phase"],
    )
    for pair in report.pairs:
        labels = [pair.audience, pair.destination]
        if pair.last_success_at is not None:
            last_success.add_metric(labels, pair.last_success_at.timestamp())
        if pair.last_status is not None:
            for status in STATUSES:
                last_status.add_metric(
                    [*labels, status], 1.0 if status == pair.last_status else 0.0
                )
        for status, count in sorted(pair.runs.items()):
            runs.add_metric([*labels, status], count)
        sent.add_metric(labels, pair.calls_sent)
        failed.add_metric(labels, pair.calls_failed)
        quarantined.add_metric(labels, pair.quarantined)
        owed.add_metric(labels, pair.owed)
        if pair.last_duration_seconds is not None:
            duration.add_metric([*labels, "total"], pair.last_duration_seconds)
    for audience, count in sorted(report.members.items()):
        members.add_metric([audience], count)
    return [last_success, last_status, members, runs, sent, failed, quarantined, owed, duration]


class StateCollector(Collector):
    """Reads the metrics from the state database when Prometheus scrapes."""

    def __init__(self, reports: ReportService) -> None:
        self._reports = reports

    def collect(self) -> Iterator[Metric]:
        yield from metric_families(self._reports.metrics())

    def describe(self) -> Iterator[Metric]:
        # Nothing at registration: describing would read the database before any scrape.
        return iter(())


def registry_for(reports: ReportService) -> CollectorRegistry:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(StateCollector(reports))
    return registry


def exposition(registry: CollectorRegistry) -> bytes:
    """The registry in Prometheus' text format."""
    return generate_latest(registry)


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format: str, *args: object) -> None:
        pass


def serve(registry: CollectorRegistry, *, host: str, port: int) -> None:
    """Serve the metrics over HTTP until interrupted (Ctrl-C ends it quietly)."""
    with (
        make_server(host, port, make_wsgi_app(registry), handler_class=_QuietHandler) as server,
        suppress(KeyboardInterrupt),
    ):
        server.serve_forever()
