"""Test support the tests and the benchmark share: the fake destination server, test
databases, configuration factories, guarantee checks and real Celery worker processes.
Nothing in the application imports it."""
