"""The read-only web console: server-rendered pages of the state database (overview,
audience, run, user lookup, failures), `/healthz` and `/metrics`."""
