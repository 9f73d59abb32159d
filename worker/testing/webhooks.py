"""A webhook receiver for the alert tests: a real HTTP server on a free local port that
records every JSON POST and answers with the statuses it is told to."""

import json
import threading
import time
from collections import deque
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any


class WebhookReceiver:
    def __init__(self) -> None:
        self.posts: list[dict[str, Any]] = []
        self.paths: list[str] = []
        self._answers: deque[int] = deque()
        self._lock = threading.Lock()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length)
                with receiver._lock:
                    receiver.posts.append(json.loads(body))
                    receiver.paths.append(self.path)
                    status = receiver._answers.popleft() if receiver._answers else 200
                self.send_response(status)
                self.send_header("Content-Type", "text/plain")
                self.end_headers()
                self.wfile.write(b"ok" if status < 400 else b"no such hook")

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self._server.server_address[1]}/hook"

    def answer(self, *statuses: int) -> None:
        """Answer the next posts with these statuses (then 200 again)."""
        with self._lock:
            self._answers.extend(statuses)

    def events(self) -> list[str]:
        with self._lock:
            return [post["audience_sync"]["event"] for post in self.posts]

    def wait_for(self, count: int, timeout: float = 10.0) -> list[dict[str, Any]]:
        """The posts once there are at least `count` (or when `timeout` runs out)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with self._lock:
                if len(self.posts) >= count:
                    return list(self.posts)
            time.sleep(0.02)
        with self._lock:
            return list(self.posts)

    def __enter__(self) -> "WebhookReceiver":
        self._thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._server.shutdown()
        self._server.server_close()
