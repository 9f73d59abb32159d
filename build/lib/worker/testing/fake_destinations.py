"""A local HTTP server emulating the three HTTP destinations, for tests and benchmarks.

It speaks, on one port, what the destinations speak to the real services, and validates what
it receives as they would (auth header, body shape, item and byte limits, required fields):

- Ortto's Segment endpoint: `GET /v1/me`, `POST /v1/identify` (Bearer key, JSON array of at
  most 500 contacts, 2 MB); answers `{"errors": [{"status", "message", "index"}]}`.
- Ortto's REST API: `POST /v1/person/merge` (`X-Api-Key`, 1-100 people, known field ids
  only), `POST /v1/person/custom-field/get`, `POST /v1/person/custom-field/create`. Answers
  take the shapes recorded from the live API: create answers
  `{"name", "field_id", "display_type"}`; a merge whose people are all invalid or suppressed
  is refused whole, `400 {"code": 400, "error": "No valid contacts provided (...)",
  "details": [{"status": "suppressed"|"invalid", "error"}]}`, one detail per person.
- Segment's Tracking API: `POST /v1/batch` (Basic auth with the write key, at most 2,500
  events, 500 KB per request, 32 KB per event).

In-process use (a thread on 127.0.0.1, a free port)::

    with FakeDestinations() as fake:
        settings = OrttoSettings(type="ortto", api_key=fake.ortto_key, endpoint=fake.url)
        ...
        fake.arrivals("ortto")        # every request: Arrival(api, method, path, status, at,
                                      #   items, size), recorded once its answer is ready
        fake.items("ortto")           # every accepted contact / person / event, as received
        fake.received("ortto")        # the same with arrival times (ReceivedItem)
        fake.state("ortto")           # {audience_key: {user_or_anonymous_id: last bool value}}

The tests' `fake` fixture yields a started one.
`at` is `time.monotonic()` at arrival (comparable across processes of one host). The state's
user key is `user_id` or else `anonymous_id` (ortto), `str::ei` or else `str::email`
(ortto-api, keyed by the custom field's name, i.e. the audience key), `userId` or else
`anonymousId` (segment); the audience keys are the boolean traits / fields received.

Faults, consumed in the order added, by the next matching API requests (`path` narrows them):

    fake.add_fault("rate_limit", count=2, seconds=1.0, style="header")   # 429 + Retry-After
    fake.add_fault("rate_limit", style="ortto", seconds=1)  # 429 + {"error": {"try-in-seconds"}}
    fake.add_fault("rate_limit", style="none")               # 429 naming no wait
    fake.add_fault("server_error", count=3, status=503)
    fake.add_fault("client_error", status=400, message="...")  # a whole request refused
    fake.add_fault("delay", seconds=2.0)   # answer a 504 late (past a read timeout)
    fake.add_fault("hold", count=3)        # keep the request unanswered and unapplied until
                                           # the client hangs up; applied only by:
    fake.release_held()                    # apply the held requests now, in arrival order
    fake.reject_items(["u1"], status=400, message="...")  # per-item error (ortto, ortto-api)
    fake.suppress(["u2"])                  # ortto-api: the person comes back "suppressed"
    fake.max_requests_per_second = 20      # answer 429 past that rate, like Ortto does
    fake.per_person_detail = False         # ortto-api: answer merges without per-person detail
    fake.field_create_shape = "nested"     # ortto-api: answer create in an older shape,
                                           # "nested" ({"field": {"id", ...}}) or "flat"
    fake.stop(); fake.start()              # connection refused meanwhile; same port after

A client using another key gets 401. `reset()` forgets requests, items, state, faults and
custom fields.

Separate process: `python -m worker.testing.fake_destinations --port N` (0: any free port)
prints `listening on http://127.0.0.1:PORT` and serves until SIGTERM/SIGINT. Its control
endpoints (no auth): `GET /_state` (state, counts, custom fields), `GET /_log?api=ortto`
(arrivals and items), `POST /_faults` (one fault or a list, as `add_fault` keywords plus
`{"kind": "item_error", "ids", "status", "message"}` and `{"kind": "suppress", "ids"}`),
`POST /_config` (`max_requests_per_second`, `per_person_detail`, `field_create_shape`),
`POST /_release` (`release_held`), `POST /_reset`. `spawn_fake_destinations()` runs it and
yields a `FakeDestinationsClient` for those endpoints.

Helpers: `sample_calls()` builds identify calls, `RecordingTransport` keeps the requests a
client sent over the real socket, `max_requests_in_window()` checks pacing.
"""

from __future__ import annotations

import argparse
import base64
import json
import re
import select
import signal
import socket
import subprocess
import sys
import threading
import time
import typing
from collections import defaultdict
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager, suppress
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, Literal
from urllib.parse import parse_qs, urlsplit

import httpx

from worker.payloads import AudienceRef, Change, identify_call

DEFAULT_ORTTO_KEY = "pau-fake-ortto-segment-key-0123456789"
DEFAULT_ORTTO_API_KEY = "fake-ortto-api-key-0123456789"
DEFAULT_SEGMENT_WRITE_KEY = "fake-segment-write-key-0123456789"

ORTTO_MAX_CONTACTS = 500
ORTTO_MAX_PEOPLE = 100
ORTTO_MAX_BYTES = 2 * 1024 * 1024
ORTTO_MAX_STRING = 255
SEGMENT_MAX_EVENTS = 2_500
SEGMENT_MAX_BYTES = 500 * 1024
SEGMENT_MAX_EVENT_BYTES = 32 * 1024

Api = Literal["ortto", "ortto-api", "segment"]
FaultKind = Literal["rate_limit", "server_error", "client_error", "delay", "hold"]
_FAULT_KINDS: tuple[FaultKind, ...] = typing.get_args(FaultKind)
# The status recorded for a held request: it never gets an answer.
HELD = 0
FieldCreateShape = Literal["recorded", "nested", "flat"]
_ROUTES: dict[tuple[str, str], Api] = {
    ("GET", "/v1/me"): "ortto",
    ("POST", "/v1/identify"): "ortto",
    ("POST", "/v1/person/merge"): "ortto-api",
    ("POST", "/v1/person/custom-field/get"): "ortto-api",
    ("POST", "/v1/person/custom-field/create"): "ortto-api",
    ("POST", "/v1/batch"): "segment",
}
_BUILTIN_PERSON_FIELDS = frozenset(
    {"str::ei", "str::email", "str::first", "str::last", "phn::phone", "str::language"}
)
_FIELD_TYPES = {"bool": "bol", "text": "str", "integer": "int", "decimal": "dcm", "date": "dtz"}


@dataclass(frozen=True, slots=True)
class Arrival:
    """One request to an emulated API, whatever the answer: `items` it carried (when it was
    read), `size` of its body in bytes."""

    api: str
    method: str
    path: str
    status: int
    at: float
    items: int
    size: int


@dataclass(frozen=True, slots=True)
class ReceivedItem:
    """One accepted contact (ortto), person (ortto-api) or event (segment)."""

    api: str
    at: float
    item: dict[str, Any]


@dataclass(slots=True)
class Fault:
    kind: FaultKind
    count: int = 1
    path: str | None = None
    seconds: float = 1.0
    style: Literal["header", "ortto", "none"] = "header"
    status: int = 503
    message: str = "refused"


@dataclass(frozen=True, slots=True)
class _HeldRequest:
    """An API request kept by a `hold` fault, to be applied by `release_held`."""

    api: Api
    method: str
    path: str
    headers: Any
    body: bytes


def max_requests_in_window(times: Iterable[float], window: float = 1.0) -> int:
    """The most arrival times that fall in any half-open interval [t, t + window)."""
    ordered = sorted(times)
    best = start = 0
    for end, at in enumerate(ordered):
        while ordered[start] <= at - window:
            start += 1
        best = max(best, end - start + 1)
    return best


class _Answer(Exception):
    """Ends handling with this status and JSON body."""

    def __init__(
        self, status: int, body: Any, headers: dict[str, str] | None = None, items: int = 0
    ) -> None:
        super().__init__(status)
        self.status = status
        self.body = body
        self.headers = headers or {}
        self.items = items


def _bad(message: str, status: int = 400) -> _Answer:
    return _Answer(status, {"error": {"code": "bad-request", "message": message}})


class FakeDestinations:
    """The emulator: its server, what it received, and the faults to inject (see module doc)."""

    def __init__(
        self,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        ortto_key: str = DEFAULT_ORTTO_KEY,
        ortto_api_key: str = DEFAULT_ORTTO_API_KEY,
        segment_write_key: str = DEFAULT_SEGMENT_WRITE_KEY,
    ) -> None:
        self.host = host
        self.port = port
        self.ortto_key = ortto_key
        self.ortto_api_key = ortto_api_key
        self.segment_write_key = segment_write_key
        self.max_requests_per_second: float | None = None
        self.per_person_detail = True
        self.field_create_shape: FieldCreateShape = "recorded"
        self._lock = threading.Lock()
        self._stopping = threading.Event()
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None
        self._reset_records()

    # -- lifecycle ---------------------------------------------------------------------

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def start(self) -> FakeDestinations:
        """Listen (again, on the same port after a stop) and serve in a daemon thread."""
        if self._server is not None:
            return self
        self._stopping.clear()
        server = _Server((self.host, self.port), _Handler)
        server.fake = self
        self.port = server.server_address[1]
        self._server = server
        self._thread = threading.Thread(
            target=server.serve_forever, kwargs={"poll_interval": 0.01}, daemon=True
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop listening and drop open connections: clients now get connection refused."""
        server, self._server = self._server, None
        if server is None:
            return
        self._stopping.set()
        server.shutdown()
        server.server_close()
        server.drop_connections()
        if self._thread is not None:
            self._thread.join(timeout=5)

    def __enter__(self) -> FakeDestinations:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    # -- faults and configuration --------------------------------------------------------

    def add_fault(
        self,
        kind: FaultKind,
        count: int = 1,
        *,
        path: str | None = None,
        seconds: float = 1.0,
        style: Literal["header", "ortto", "none"] = "header",
        status: int | None = None,
        message: str = "refused",
    ) -> None:
        if kind not in _FAULT_KINDS:
            raise ValueError(f"unknown fault kind {kind!r}")
        if status is None:
            status = 400 if kind == "client_error" else 503
        with self._lock:
            self._faults.append(Fault(kind, count, path, seconds, style, status, message))

    def reject_items(
        self, ids: Iterable[str], *, status: int = 400, message: str = "invalid contact"
    ) -> None:
        """Answer a per-item error for these user ids (ortto: `errors`; ortto-api: `error`)."""
        with self._lock:
            for item_id in ids:
                self._item_errors[item_id] = (status, message)

    def suppress(self, ids: Iterable[str]) -> None:
        """ortto-api: answer `suppressed` (and store nothing) for these people."""
        with self._lock:
            self._suppressed.update(ids)

    def add_custom_field(self, name: str, type_: str = "bool") -> str:
        """Create an ortto-api custom person field as if by hand; return its id."""
        if type_ not in _FIELD_TYPES:
            raise ValueError(f"type must be one of {sorted(_FIELD_TYPES)}")
        with self._lock:
            try:
                return self._create_field(name, type_)
            except _Answer as refused:
                raise ValueError(str(refused.body)) from None

    def release_held(self) -> int:
        """Apply the requests `hold` faults kept, in arrival order, as a destination that
        processed them late; their clients got no answer. Returns how many there were."""
        with self._lock:
            held = self._held.copy()
            self._held.clear()
        for request in held:
            # Refused now as it would have been on time (a key, a body): nothing applied.
            with suppress(_Answer):
                self._authenticate(request.api, request.headers)
                self._dispatch(
                    request.method, request.path, request.headers, request.body, time.monotonic()
                )
        return len(held)

    def reset(self) -> None:
        with self._lock:
            self._reset_records()

    # -- what was received ----------------------------------------------------------------

    def arrivals(self, api: str | None = None) -> list[Arrival]:
        with self._lock:
            return [a for a in self._arrivals if api is None or a.api == api]

    def received(self, api: str) -> list[ReceivedItem]:
        with self._lock:
            return [r for r in self._received if r.api == api]

    def items(self, api: str) -> list[dict[str, Any]]:
        return [r.item for r in self.received(api)]

    def state(self, api: str) -> dict[str, dict[str, bool]]:
        with self._lock:
            return {key: dict(values) for key, values in self._state[api].items()}

    @property
    def custom_fields(self) -> dict[str, str]:
        """ortto-api custom fields: name -> id."""
        with self._lock:
            return {name: fid for fid, (name, _) in self._fields.items()}

    def snapshot(self, *, with_log: bool = False, api: str | None = None) -> dict[str, Any]:
        """A JSON-able view, as served by `GET /_state` and `GET /_log`."""
        with self._lock:
            counts: dict[str, dict[str, int]] = {}
            for name in ("ortto", "ortto-api", "segment"):
                counts[name] = {
                    "requests": sum(1 for a in self._arrivals if a.api == name),
                    "items": sum(1 for r in self._received if r.api == name),
                }
            view: dict[str, Any] = {
                "state": {
                    name: {key: dict(values) for key, values in per_key.items()}
                    for name, per_key in self._state.items()
                },
                "counts": counts,
                "custom_fields": {fid: name for fid, (name, _) in self._fields.items()},
            }
            if with_log:
                view["arrivals"] = [
                    asdict(a) for a in self._arrivals if api is None or a.api == api
                ]
                view["items"] = [asdict(r) for r in self._received if api is None or r.api == api]
            return view

    # -- request handling (called by the handler threads) ----------------------------------

    def _reset_records(self) -> None:
        self._arrivals: list[Arrival] = []
        self._received: list[ReceivedItem] = []
        self._state: dict[str, dict[str, dict[str, bool]]] = defaultdict(lambda: defaultdict(dict))
        self._faults: list[Fault] = []
        self._item_errors: dict[str, tuple[int, str]] = {}
        self._suppressed: set[str] = set()
        self._fields: dict[str, tuple[str, str]] = {}  # id -> (name, type)
        self._people: set[str] = set()
        self._held: list[_HeldRequest] = []

    def _handle(self, method: str, path: str, headers: Any, body: bytes, at: float) -> _Answer:
        """Answer one API request: faults first (as an edge would), then auth, rate, content."""
        if (method, path) not in _ROUTES:
            return _Answer(404, {"error": {"code": "not-found", "message": "no such route"}})
        api = _ROUTES[(method, path)]
        try:
            fault = self._take_fault(path)
            if fault is not None and fault.kind == "delay":
                self._stopping.wait(fault.seconds)
                raise _Answer(504, {"error": {"code": "timeout", "message": "late"}})
            if fault is not None and fault.kind == "hold":
                with self._lock:
                    self._held.append(_HeldRequest(api, method, path, headers, body))
                raise _Answer(HELD, None)
            if fault is not None:
                raise self._fault_answer(fault)
            self._authenticate(api, headers)
            self._throttle(at)
            return _Answer(*self._dispatch(method, path, headers, body, at))
        except _Answer as answer:
            return answer

    def _take_fault(self, path: str) -> Fault | None:
        with self._lock:
            for fault in self._faults:
                if fault.path is None or fault.path == path:
                    fault.count -= 1
                    if fault.count <= 0:
                        self._faults.remove(fault)
                    return fault
        return None

    @staticmethod
    def _fault_answer(fault: Fault) -> _Answer:
        if fault.kind == "server_error":
            return _Answer(fault.status, {"error": {"code": "internal", "message": "boom"}})
        if fault.kind == "client_error":
            return _Answer(fault.status, {"error": {"code": "refused", "message": fault.message}})
        if fault.style == "ortto":
            body = {
                "error": {
                    "code": "rate-limit",
                    "message": "rate limit",
                    "try-in-seconds": fault.seconds,
                }
            }
            return _Answer(429, body)
        headers = {"Retry-After": _seconds_text(fault.seconds)} if fault.style == "header" else {}
        return _Answer(429, {"error": {"code": "rate-limit", "message": "rate limit"}}, headers)

    def _authenticate(self, api: Api, headers: Any) -> None:
        if api == "ortto":
            ok = headers.get("Authorization") == f"Bearer {self.ortto_key}"
        elif api == "ortto-api":
            ok = headers.get("X-Api-Key") == self.ortto_api_key
        else:
            expected = base64.b64encode(f"{self.segment_write_key}:".encode()).decode()
            ok = headers.get("Authorization") == f"Basic {expected}"
        if not ok:
            raise _Answer(401, {"error": {"code": "unauthorized", "message": "invalid api key"}})

    def _throttle(self, at: float) -> None:
        limit = self.max_requests_per_second
        if limit is None:
            return
        with self._lock:
            recent = sum(1 for a in self._arrivals if a.status != 429 and a.at > at - 1.0)
        if recent + 1 > limit:
            raise _Answer(
                429,
                {"error": {"code": "rate-limit", "message": "rate limit", "try-in-seconds": 1}},
            )

    def _dispatch(
        self, method: str, path: str, headers: Any, body: bytes, at: float
    ) -> tuple[int, Any, dict[str, str], int]:
        if method == "GET":  # /v1/me
            return 200, {"id": "fake-account", "name": "Fake Ortto account"}, {}, 0
        if not headers.get("Content-Type", "").startswith("application/json") and body:
            raise _bad("Content-Type must be application/json", 415)
        if path == "/v1/identify":
            return self._ortto_identify(body, at)
        if path == "/v1/person/merge":
            return self._ortto_merge(body, at)
        if path == "/v1/person/custom-field/get":
            return self._ortto_fields()
        if path == "/v1/person/custom-field/create":
            return self._ortto_create_field(body)
        return self._segment_batch(body, at)

    def _ortto_identify(self, raw: bytes, at: float) -> tuple[int, Any, dict[str, str], int]:
        if len(raw) > ORTTO_MAX_BYTES:
            raise _bad(f"payload of {len(raw)} bytes is over 2 MB", 413)
        contacts = _json(raw)
        if not isinstance(contacts, list):
            raise _bad("body must be a JSON array of contacts")
        if not 1 <= len(contacts) <= ORTTO_MAX_CONTACTS:
            raise _bad(f"{len(contacts)} contacts: send 1 to {ORTTO_MAX_CONTACTS}")
        errors: list[dict[str, Any]] = []
        with self._lock:
            for index, contact in enumerate(contacts):
                problem = _contact_problem(contact)
                if problem is None:
                    item_id = contact.get("user_id") or contact.get("anonymous_id")
                    if item_id in self._item_errors:
                        status, message = self._item_errors[item_id]
                        errors.append({"status": status, "message": message, "index": index})
                        continue
                    self._received.append(ReceivedItem("ortto", at, contact))
                    for key, value in contact.get("traits", {}).items():
                        if isinstance(value, bool):
                            self._state["ortto"][key][item_id] = value
                else:
                    errors.append({"status": 400, "message": problem, "index": index})
        return 200, ({"errors": errors} if errors else {}), {}, len(contacts)

    def _ortto_merge(self, raw: bytes, at: float) -> tuple[int, Any, dict[str, str], int]:
        if len(raw) > ORTTO_MAX_BYTES:
            raise _bad(f"payload of {len(raw)} bytes is over 2 MB", 413)
        body = _json(raw)
        if not isinstance(body, dict):
            raise _bad("body must be a JSON object")
        people = body.get("people")
        merge_by = body.get("merge_by")
        if not isinstance(people, list) or not 1 <= len(people) <= ORTTO_MAX_PEOPLE:
            raise _bad(f"people: send 1 to {ORTTO_MAX_PEOPLE}")
        if (
            not isinstance(merge_by, list)
            or not 1 <= len(merge_by) <= 3
            or not all(isinstance(f, str) for f in merge_by)
        ):
            raise _bad("merge_by: 1 to 3 field ids")
        if body.get("merge_strategy") not in (1, 2, 3) or body.get("find_strategy") not in (
            0,
            1,
            2,
        ):
            raise _bad("merge_strategy must be 1-3 and find_strategy 0-2")
        if not isinstance(body.get("async", False), bool):
            raise _bad("async must be a boolean")
        answers: list[dict[str, Any]] = []
        with self._lock:
            known = _BUILTIN_PERSON_FIELDS | set(self._fields)
            for person in people:
                fields = person.get("fields") if isinstance(person, dict) else None
                if not isinstance(fields, dict):
                    raise _bad("each person needs a fields object")
                unknown = sorted(set(fields) - known)
                if unknown:
                    raise _bad(f"unknown field {unknown[0]!r}")
            for person in people:
                fields = person["fields"]
                answers.append(self._merge_person(fields, merge_by, at))
        if all(answer["status"] not in ("created", "merged") for answer in answers):
            # Recorded from the live API: no valid person refuses the whole request.
            details = [
                {
                    "status": "suppressed" if answer["status"] == "suppressed" else "invalid",
                    "error": answer.get("error") or "contact is suppressed",
                }
                for answer in answers
            ]
            error = f"No valid contacts provided ({len(details)} invalid or suppressed)"
            body_refused = {"code": 400, "error": error, "details": details}
            raise _Answer(400, body_refused, items=len(people))
        body_out = {"people": answers} if self.per_person_detail else {}
        return 200, body_out, {}, len(people)

    def _merge_person(
        self, fields: dict[str, Any], merge_by: Sequence[str], at: float
    ) -> dict[str, Any]:
        person_key = str(fields.get("str::ei") or fields.get("str::email") or "")
        if not any(fields.get(f) for f in merge_by):
            return {"status": "error", "error": "none of the merge_by fields has a value"}
        for field_id, value in fields.items():
            if field_id.startswith("str:") and (
                not isinstance(value, str) or len(value) > ORTTO_MAX_STRING
            ):
                return {"status": "error", "error": f"{field_id} must be text of <= 255 chars"}
            if field_id.startswith("bol:") and not isinstance(value, bool):
                return {"status": "error", "error": f"{field_id} must be a boolean"}
        ids = {fields.get("str::ei"), fields.get("str::email")} - {None}
        for item_id in ids:
            if item_id in self._item_errors:
                return {"status": "error", "error": self._item_errors[item_id][1]}
        if ids & self._suppressed:
            return {"person_id": "", "status": "suppressed"}
        self._received.append(ReceivedItem("ortto-api", at, {"fields": fields}))
        for field_id, value in fields.items():
            if field_id in self._fields:
                self._state["ortto-api"][self._fields[field_id][0]][person_key] = value
        status = "merged" if person_key in self._people else "created"
        self._people.add(person_key)
        return {"person_id": f"p-{person_key}", "status": status}

    def _ortto_fields(self) -> tuple[int, Any, dict[str, str], int]:
        with self._lock:
            fields = [
                {
                    "field": {
                        "id": fid,
                        "name": name,
                        "display_type": "boolean" if kind == "bool" else kind,
                        "liquid_name": f"people.custom.{fid.split(':cm:')[1]}",
                    },
                    "tracked_value": False,
                }
                for fid, (name, kind) in self._fields.items()
            ]
        return 200, {"fields": fields}, {}, 0

    def _ortto_create_field(self, raw: bytes) -> tuple[int, Any, dict[str, str], int]:
        body = _json(raw)
        if not isinstance(body, dict) or not isinstance(body.get("name"), str):
            raise _bad("name is required")
        if body.get("type") not in _FIELD_TYPES:
            raise _bad(f"type must be one of {sorted(_FIELD_TYPES)}")
        with self._lock:
            if any(name == body["name"] for name, _ in self._fields.values()):
                raise _bad(f"a field named {body['name']!r} already exists", 409)
            fid = self._create_field(body["name"], body["type"])
        display_type = "boolean" if body["type"] == "bool" else body["type"]
        if self.field_create_shape == "recorded":
            return 200, {"name": body["name"], "field_id": fid, "display_type": display_type}, {}, 0
        described = {"id": fid, "name": body["name"], "display_type": display_type}
        if self.field_create_shape == "nested":
            return 200, {"field": described, "tracked_value": False}, {}, 0
        return 200, described, {}, 0

    def _create_field(self, name: str, type_: str) -> str:
        folded = re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")
        fid = f"{_FIELD_TYPES[type_]}:cm:{folded}"
        if fid in self._fields:
            raise _bad(f"a field with id {fid!r} already exists", 409)
        self._fields[fid] = (name, type_)
        return fid

    def _segment_batch(self, raw: bytes, at: float) -> tuple[int, Any, dict[str, str], int]:
        if len(raw) > SEGMENT_MAX_BYTES:
            raise _bad(f"batch of {len(raw)} bytes is over 500 KB", 400)
        body = _json(raw)
        batch = body.get("batch") if isinstance(body, dict) else None
        if not isinstance(batch, list):
            raise _bad('body must be {"batch": [...]}')
        if len(batch) > SEGMENT_MAX_EVENTS:
            raise _bad(f"{len(batch)} events: at most {SEGMENT_MAX_EVENTS} per batch")
        for event in batch:
            problem = _event_problem(event)
            if problem:
                raise _bad(problem)
        with self._lock:
            for event in batch:
                item_id = event.get("userId") or event.get("anonymousId")
                self._received.append(ReceivedItem("segment", at, event))
                for key, value in (event.get("traits") or {}).items():
                    if isinstance(value, bool):
                        self._state["segment"][key][item_id] = value
        return 200, {"success": True}, {}, len(batch)

    def _record(self, arrival: Arrival) -> None:
        with self._lock:
            self._arrivals.append(arrival)

    def _apply_control(self, method: str, path: str, query: str, raw: bytes) -> _Answer:
        params = parse_qs(query)
        if method == "GET" and path == "/_state":
            return _Answer(200, self.snapshot())
        if method == "GET" and path == "/_log":
            api = params.get("api", [None])[0]
            return _Answer(200, self.snapshot(with_log=True, api=api))
        if method == "POST" and path == "/_release":
            return _Answer(200, {"released": self.release_held()})
        if method == "POST" and path == "/_reset":
            self.reset()
            return _Answer(200, {"ok": True})
        if method == "POST" and path == "/_config":
            config = _json(raw)
            for name in ("max_requests_per_second", "per_person_detail", "field_create_shape"):
                if isinstance(config, dict) and name in config:
                    setattr(self, name, config[name])
            return _Answer(200, {"ok": True})
        if method == "POST" and path == "/_faults":
            specs = _json(raw)
            for spec in specs if isinstance(specs, list) else [specs]:
                spec = dict(spec)
                kind = spec.pop("kind")
                if kind == "item_error":
                    self.reject_items(spec.pop("ids"), **spec)
                elif kind == "suppress":
                    self.suppress(spec["ids"])
                else:
                    self.add_fault(kind, **spec)
            return _Answer(200, {"ok": True})
        return _Answer(404, {"error": {"message": "no such control endpoint"}})


def _json(raw: bytes) -> Any:
    try:
        return json.loads(raw or b"null")
    except ValueError as exc:
        raise _bad(f"body is not JSON: {exc}") from exc


def _seconds_text(seconds: float) -> str:
    return str(int(seconds)) if float(seconds).is_integer() else str(seconds)


def _contact_problem(contact: Any) -> str | None:
    if not isinstance(contact, dict):
        return "contact must be an object"
    ids = [contact.get("user_id"), contact.get("anonymous_id")]
    if not any(isinstance(i, str) and i for i in ids):
        return "user_id or anonymous_id is required"
    if any(i is not None and not isinstance(i, str) for i in ids):
        return "user_id and anonymous_id must be strings"
    if not isinstance(contact.get("traits", {}), dict):
        return "traits must be an object"
    for name in ("message_id", "timestamp"):
        if name in contact and not isinstance(contact[name], str):
            return f"{name} must be a string"
    return None


def _event_problem(event: Any) -> str | None:
    if not isinstance(event, dict):
        return "each event must be an object"
    if len(json.dumps(event, separators=(",", ":")).encode()) > SEGMENT_MAX_EVENT_BYTES:
        return "event over 32 KB"
    if event.get("type") not in ("identify", "track", "page", "screen", "group", "alias"):
        return "event type is missing or unknown"
    if not (event.get("userId") or event.get("anonymousId")):
        return "userId or anonymousId is required"
    return None


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    # Keep-alive handler threads must not hold up a stop; stop() closes their sockets.
    block_on_close = False
    fake: FakeDestinations

    def __init__(self, address: tuple[str, int], handler: type[BaseHTTPRequestHandler]) -> None:
        self.connections: set[socket.socket] = set()
        self.connections_lock = threading.Lock()
        super().__init__(address, handler)

    def drop_connections(self) -> None:
        with self.connections_lock:
            connections, self.connections = self.connections, set()
        for connection in connections:
            with suppress(OSError):
                connection.shutdown(socket.SHUT_RDWR)


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, as the clients use it
    # Headers and body leave in two writes: without this, delayed ACKs add 40 ms per answer.
    disable_nagle_algorithm = True
    timeout = 60
    server: _Server

    def setup(self) -> None:
        super().setup()
        with self.server.connections_lock:
            self.server.connections.add(self.connection)

    def finish(self) -> None:
        with self.server.connections_lock:
            self.server.connections.discard(self.connection)
        with suppress(OSError):
            super().finish()

    def do_GET(self) -> None:
        self._serve("GET")

    def do_POST(self) -> None:
        self._serve("POST")

    def log_message(self, format: str, *args: Any) -> None:
        """Quiet: tests read the records instead."""

    def _serve(self, method: str) -> None:
        at = time.monotonic()
        fake = self.server.fake
        split = urlsplit(self.path)
        path = split.path.rstrip("/") or "/"
        length = self.headers.get("Content-Length")
        if length is None and self.headers.get("Transfer-Encoding"):
            self._reply(_Answer(411, {"error": {"message": "Content-Length required"}}))
            return
        raw = self.rfile.read(int(length or 0))
        if path.startswith("/_"):
            self._reply(fake._apply_control(method, path, split.query, raw))
            return
        answer = fake._handle(method, path, self.headers, raw, at)
        api = _ROUTES.get((method, path), "unknown")
        fake._record(Arrival(api, method, path, answer.status, at, answer.items, len(raw)))
        if answer.status == HELD:
            self._await_hang_up()
        else:
            self._reply(answer)

    def _await_hang_up(self) -> None:
        """Answer nothing until the client gives up on the request and closes its connection
        (or the server stops), then close ours."""
        self.close_connection = True
        stopping = self.server.fake._stopping
        while not stopping.is_set():
            # Readable means closed: a client waiting for its answer sends nothing more.
            readable, _, _ = select.select([self.connection], [], [], 0.05)
            if readable:
                return

    def _reply(self, answer: _Answer) -> None:
        data = json.dumps(answer.body).encode()
        try:
            self.send_response(answer.status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            for name, value in answer.headers.items():
                self.send_header(name, value)
            self.end_headers()
            self.wfile.write(data)
            self.wfile.flush()
        except OSError:
            # The client gave up (a delay fault past its read timeout): nobody to answer.
            self.close_connection = True


def sample_calls(
    audience: AudienceRef,
    count: int,
    *,
    destination_id: int = 1,
    anonymous_every: int = 10,
    email_every: int = 3,
    now: datetime | None = None,
) -> list[dict[str, Any]]:
    """`count` identify calls: members `u{i}`, every `anonymous_every`-th anonymous (`a{i}`),
    an email for users with i % email_every != 0, value True for even i and False for odd."""
    when = now or datetime(2026, 11, 28, 12, 0, tzinfo=UTC)
    calls = []
    for i in range(count):
        is_anonymous = anonymous_every > 0 and i % anonymous_every == anonymous_every - 1
        change = Change(
            member_id=f"a{i}" if is_anonymous else f"u{i}",
            is_anonymous=is_anonymous,
            email=f"user{i}@example.com" if email_every and i % email_every else None,
            value=i % 2 == 0,
            previous_run_id=None,
        )
        calls.append(identify_call(audience, destination_id, change, now=when))
    return calls


class RecordingTransport(httpx.HTTPTransport):
    """A real network transport that also keeps every request it sent (headers, body)."""

    def __init__(self) -> None:
        super().__init__()
        self.requests: list[httpx.Request] = []

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(request)
        return super().handle_request(request)


class FakeDestinationsClient:
    """Talks to the control endpoints of a FakeDestinations running in another process."""

    def __init__(self, url: str) -> None:
        self.url = url
        self._client = httpx.Client(base_url=url, timeout=30)

    def state(self) -> dict[str, Any]:
        return self._get("/_state")

    def log(self, api: str | None = None) -> dict[str, Any]:
        return self._get("/_log", params={"api": api} if api else None)

    def add_fault(self, kind: str, **options: Any) -> None:
        self._post("/_faults", {"kind": kind, **options})

    def configure(self, **options: Any) -> None:
        self._post("/_config", options)

    def release_held(self) -> int:
        released: int = self._post("/_release", {})["released"]
        return released

    def reset(self) -> None:
        self._post("/_reset", {})

    def close(self) -> None:
        self._client.close()

    def _get(self, path: str, params: dict[str, str] | None = None) -> dict[str, Any]:
        response = self._client.get(path, params=params)
        response.raise_for_status()
        result: dict[str, Any] = response.json()
        return result

    def _post(self, path: str, body: Any) -> dict[str, Any]:
        response = self._client.post(path, json=body)
        response.raise_for_status()
        result: dict[str, Any] = response.json()
        return result


@contextmanager
def spawn_fake_destinations(
    *, port: int = 0, extra_args: Sequence[str] = ()
) -> Iterator[FakeDestinationsClient]:
    """Run the emulator as a separate process; yield a client of its control endpoints."""
    root = Path(__file__).resolve().parents[2]
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "worker.testing.fake_destinations",
            "--port",
            str(port),
            *extra_args,
        ],
        cwd=root,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert process.stdout is not None
        ready, _, _ = select.select([process.stdout], [], [], 30)
        line = process.stdout.readline() if ready else ""
        if not line.startswith("listening on "):
            raise RuntimeError(f"the fake destinations process did not start: {line!r}")
        client = FakeDestinationsClient(line.removeprefix("listening on ").strip())
        try:
            yield client
        finally:
            client.close()
    finally:
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Emulate Ortto and Segment for tests.")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--ortto-key", default=DEFAULT_ORTTO_KEY)
    parser.add_argument("--ortto-api-key", default=DEFAULT_ORTTO_API_KEY)
    parser.add_argument("--segment-write-key", default=DEFAULT_SEGMENT_WRITE_KEY)
    parser.add_argument("--max-requests-per-second", type=float, default=None)
    args = parser.parse_args(argv)
    fake = FakeDestinations(
        host=args.host,
        port=args.port,
        ortto_key=args.ortto_key,
        ortto_api_key=args.ortto_api_key,
        segment_write_key=args.segment_write_key,
    )
    fake.max_requests_per_second = args.max_requests_per_second
    done = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: done.set())
    signal.signal(signal.SIGINT, lambda *_: done.set())
    with fake:
        print(f"listening on {fake.url}", flush=True)
        while not done.wait(0.5):
            pass


if __name__ == "__main__":
    main()
