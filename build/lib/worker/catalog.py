"""The catalog: apply a configuration, pick the pairs to sync, tell what each pair's schedule
says, check the destinations (the other reads are `worker.reports`)."""

from collections.abc import Collection, Sequence

from sqlalchemy.orm import Session

from worker.config import Config, resolve_source_url
from worker.context import ServiceContext
from worker.domain import ApplyReport, PairStatus
from worker.errors import ConfigError, DestinationError, NotFoundError, SourceError
from worker.plan import (
    ApplyRefused,
    AudienceState,
    CatalogState,
    DestinationState,
    Plan,
    SourceState,
    compute_plan,
)
from worker.repositories import alerts as alert_repo
from worker.repositories import audiences as audience_repo
from worker.repositories import runs as run_repo
from worker.runs import pair_run_state
from worker.scheduling import is_due, next_due, parse_schedule
from worker.sources import check_query


def _catalog_state(session: Session) -> CatalogState:
    """The catalog's current values, as the plan compares them."""
    sources = audience_repo.sources_by_name(session)
    destinations = audience_repo.destinations_by_name(session)
    names = {d.id: d.name for d in destinations.values()}
    return CatalogState(
        sources=tuple(
            SourceState(s.name, s.url, s.statement_timeout_seconds) for s in sources.values()
        ),
        destinations=tuple(
            DestinationState(d.name, d.type, dict(d.settings)) for d in destinations.values()
        ),
        audiences=tuple(
            AudienceState(
                key=a.key,
                name=a.name,
                source=a.source.name,
                query=a.query,
                schedule=a.schedule,
                destinations=tuple(
                    sorted(names[link.destination_id] for link in a.links if link.is_enabled)
                ),
                max_exit_fraction=a.max_exit_fraction,
                is_archived=a.is_archived,
            )
            for a in audience_repo.all_audiences(session)
        ),
    )


class Catalog:
    def __init__(self, ctx: ServiceContext) -> None:
        self._ctx = ctx

    def plan(
        self,
        config: Config,
        *,
        check_queries: bool = False,
        allow_archive_all: bool = False,
        allowed_new_keys: Collection[str] = (),
    ) -> Plan:
        """What applying `config` would do, and why it would be refused (changes nothing)."""
        if check_queries:
            self._check_queries(config)
        with self._ctx.unit_of_work() as session:
            return compute_plan(
                _catalog_state(session),
                config,
                allow_archive_all=allow_archive_all,
                allowed_new_keys=allowed_new_keys,
            )

    def apply(
        self,
        config: Config,
        *,
        check_queries: bool = True,
        allow_archive_all: bool = False,
        allowed_new_keys: Collection[str] = (),
    ) -> ApplyReport:
        """Create/update sources, destinations and audiences from a validated Config, in one
        transaction; audiences missing from it are archived. The plan is computed inside that
        transaction; a refused plan (see `worker.plan`) raises ApplyRefused, writing nothing."""
        if check_queries:
            self._check_queries(config)
        now = self._ctx.clock()
        with self._ctx.unit_of_work() as session:
            plan = compute_plan(
                _catalog_state(session),
                config,
                allow_archive_all=allow_archive_all,
                allowed_new_keys=allowed_new_keys,
            )
            if plan.is_refused:
                raise ApplyRefused(plan)
            sources = audience_repo.save_sources(session, config.sources)
            destinations = audience_repo.save_destinations(session, config.destinations)
            existing = {a.key: a for a in audience_repo.all_audiences(session)}
            for aspec in config.audiences:
                audience = existing.pop(aspec.key, None)
                values = {
                    "name": aspec.name,
                    "source_id": sources[aspec.source].id,
                    "query": aspec.query,
                    "schedule": aspec.schedule,
                    "max_exit_fraction": aspec.max_exit_fraction,
                    "is_archived": False,
                }
                if audience is None:
                    audience = audience_repo.create_audience(
                        session, key=aspec.key, now=now, **values
                    )
                else:
                    audience_repo.update_audience(session, audience, now=now, **values)
                wanted = {destinations[name].id for name in aspec.destinations}
                audience_repo.set_destinations(session, audience, wanted)
            for audience in existing.values():
                audience_repo.archive_audience(session, audience, now=now)
            alert_repo.save_channels(session, config.alerts)
        return plan.report()

    def _check_queries(self, config: Config) -> None:
        sources = {s.name: s for s in config.sources}
        for audience in config.audiences:
            source = sources[audience.source]
            try:
                check_query(
                    resolve_source_url(source.name, source.url, self._ctx.env),
                    audience.query,
                    timeout_seconds=source.statement_timeout_seconds,
                    source_name=source.name,
                )
            except SourceError as exc:
                raise ConfigError(f"audience {audience.key!r}: {exc}") from None

    def select_pairs(
        self, *, audience_keys: Sequence[str] = (), destination_name: str | None = None
    ) -> list[int]:
        """Ids of the pairs to sync: the named audiences (all active ones when none named)."""
        with self._ctx.unit_of_work() as session:
            for key in audience_keys:
                audience = audience_repo.audience_by_key(session, key)
                if audience is None:
                    raise NotFoundError(
                        f"no audience with key {key!r}; `audience-sync audiences list` shows them"
                    )
                if audience.is_archived:
                    raise ConfigError(
                        f"audience {key!r} is archived; add it back to the file "
                        "and `apply` to sync it again"
                    )
            if destination_name and not audience_repo.destination_by_name(
                session, destination_name
            ):
                raise NotFoundError(f"no destination named {destination_name!r}")
            found = audience_repo.pairs(
                session,
                audience_keys=list(audience_keys) or None,
                destination_name=destination_name,
            )
            return [pair.id for pair in found]

    def check_destinations(self, name: str | None = None) -> list[tuple[str, bool, str]]:
        """(destination, ok, message) for each destination (or the named one)."""
        with self._ctx.unit_of_work() as session:
            found = audience_repo.destinations_by_name(session)
            if name is not None and name not in found:
                raise NotFoundError(f"no destination named {name!r}")
            targets = [
                (d.name, dict(d.settings)) for d in found.values() if name is None or d.name == name
            ]
        results = []
        for destination, template in targets:
            try:
                client = self._ctx.destinations.get(destination, template)
                results.append((destination, True, client.check()))
            except (DestinationError, ConfigError) as exc:
                results.append((destination, False, str(exc)))
        return results

    def status(self) -> list[PairStatus]:
        """Every active pair: its last run, when it is next due, whether a run holds it."""
        now = self._ctx.clock()
        with self._ctx.unit_of_work() as session:
            started = run_repo.last_started(session)
            latest = run_repo.latest_runs(session)
            result = []
            for pair in audience_repo.pairs(session):
                key = (pair.audience_id, pair.destination_id)
                run = latest.get(key)
                result.append(
                    PairStatus(
                        pair_id=pair.id,
                        audience_key=pair.audience.key,
                        destination=pair.destination.name,
                        schedule=pair.audience.schedule,
                        last_run_id=run.id if run else None,
                        last_status=run.status if run else None,
                        last_started_at=run.started_at if run else None,
                        next_due_at=next_due(
                            parse_schedule(pair.audience.schedule), started.get(key), now=now
                        ),
                        is_running=pair.lock_owner is not None
                        and pair.lock_expires_at is not None
                        and pair.lock_expires_at > now,
                        run_state=pair_run_state(session, pair, now=now, ttl=self._ctx.lock_ttl),
                        is_full_sync_owed=pair.is_full_sync_owed,
                    )
                )
        return result

    def due_pairs(self) -> list[int]:
        """Pairs whose schedule says they should run now and that no run holds."""
        rows = self.status()
        # Read the clock after status(): a pair that never ran is due at status()'s own now.
        now = self._ctx.clock()
        return [p.pair_id for p in rows if is_due(p.next_due_at, now=now) and not p.is_running]

    def is_due(self, pair_id: int) -> bool:
        """Whether the pair's schedule says it should run now (held by a run or not)."""
        rows = self.status()
        now = self._ctx.clock()
        return any(p.pair_id == pair_id and is_due(p.next_due_at, now=now) for p in rows)
