"""Test support the tests and the benchmark share: the fake destination server, test
databases, configuration factories, guarantee checks and real Celery worker processes.
Nothing in the application imports it.

It is meant for the source tree (the tests and the benchmark run from a checkout): the
processes it starts (`audience-sync`, `celery -A worker`, the fake destination server) run
in `IMPORT_ROOT`, the directory this `worker` package is imported from, rather than in a
directory guessed from the repository's layout: `python -m` there imports the very code the
test imported.
"""

from pathlib import Path

import worker

IMPORT_ROOT = Path(worker.__file__).resolve().parent.parent
