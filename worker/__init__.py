"""audience-sync: compute audiences from your own data and keep destinations in sync.

Module map (one line each; the service's parts run top to bottom of a run):

    settings       process settings, read from AUDIENCE_SYNC_* variables at the edges
    envrefs        `${VAR}` references in configuration values: find and resolve them
    config         the audiences file: load and validate it
    keys           audience keys from names
    scheduling     schedules ("every 1h", cron) and when a pair is next due
    sources        audience queries: check, stream rows, clean them into members
    rules/         rule audiences: conditions on events and traits compiled to SQL
    audiences      an audience's definition: compiling rule audiences, show and preview
    payloads       the identify and track calls of one user's change (send_as)
    batching       cutting identify calls into batches a destination accepts
    ratelimit      rate-limit parsing and the local and Redis token buckets
    destinations/  destination clients: the registry of types, typed settings, the HTTP
                   base, one module per destination type
    pool           destination clients, built once per process and reused
    db             state database engines, sessions, units of work, migrations
    domain         the vocabulary: RunStatus, RunMode, Trigger and the service's values
    errors         the exception tree: configuration, source and destination errors
    context        what the service's parts share (sessions, settings, clock, env, hooks)
    crashpoints    the crash-point hook: a no-op, or the guarantee tests' kill switch
    locking        the pair's run lock, its heartbeat, lock-or-skip; where a run runs, stops
    snapshotting   loading a source into a snapshot's staging table (COPY or streamed)
    runs           the run lifecycle: open, snapshot, plan, guards; finish, fail
    delivery       delivering a run's changes page by page and recording the answers
    archive        archiving an audience: a run against an empty membership
    plan           the plan of an apply (create, change, revive, archive) and its refusals
    catalog        apply a configuration, select pairs, status, checks, reads
    service        SyncService, the one door the CLI, tasks, demo and bench call
    reports        the read side the CLI and the console show: audiences, history, runs,
                   failures, explain, metrics, the overview, health
    alerts         alert webhooks: a pair's state changes, stale pairs, the dispatcher's tick
    webhooks       posting an alert: one JSON POST, retried, never raising
    metrics        Prometheus metrics computed from the state database at scrape time
    logs           log lines, text or JSON, carrying the run's id, audience and destination
    console/       the read-only web console: Starlette app, templates, SVG charts
    render         how summaries, statuses and runs look (shared by the CLI and the demo)
    runtime        per-process wiring: engine, sessions, destination pool, service
    celery         the Celery app and its limits
    tasks          Celery tasks: thin wrappers around the service
    cli            the `audience-sync` command line
    demo           the self-contained demo
    testing/       test support shared by the tests and the benchmark (never imported here)
    repositories/  every SQL statement, one owner per table:
      dialect      is_postgresql and the ON CONFLICT insert of each backend
      audiences    sources, destinations, audiences, pairs and the pair lock
      snapshots    staging tables, the bad-row rules in SQL, membership and its log
      maintenance  VACUUM, ANALYZE and truncation when due, keeping the state small (PostgreSQL)
      changes      run_changes: the diff, pages, chunks
      synced       synced_members: what each destination accepted
      failures     failing_members and delivery_failures: rejections, quarantine, doubt
      runs         sync_runs: runs, counters, outcomes, history
      alerts       alert_channels, alert_states, alerts_sent, heartbeats
      monitoring   read-only aggregates of runs and failing users (metrics, console)
"""
