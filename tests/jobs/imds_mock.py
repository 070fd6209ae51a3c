"""A mock EC2 instance metadata service (IMDSv2), run as a real process on 127.0.0.1.

``python imds_mock.py CONTROL_DIR`` listens on a free loopback port, prints it
on one line, and serves:

* ``PUT /latest/api/token`` with ``X-aws-ec2-metadata-token-ttl-seconds``:
  a fresh token (without the header: 400, as EC2 does);
* ``GET`` with ``X-aws-ec2-metadata-token``: 401 without a token or with one
  that is unknown or expired — a token expires after ``CONTROL_DIR/token-uses``
  GETs (when that file exists), so a client must take a new one;
* ``/latest/meta-data/spot/instance-action``: 404 until ``CONTROL_DIR/instance-action.json``
  exists and this path has been asked more than ``CONTROL_DIR/instance-action.after``
  times (default 0), then that file's content;
* ``/latest/meta-data/events/recommendations/rebalance``: 404 until
  ``CONTROL_DIR/rebalance.json`` exists, then its content.

Every request is appended to ``CONTROL_DIR/requests.log`` as ``METHOD PATH STATUS``.
"""

from __future__ import annotations

import http.server
import secrets
import sys
import threading
from pathlib import Path

CONTROL = Path(sys.argv[1])
LOCK = threading.Lock()
TOKENS: dict[str, int] = {}  # token -> GETs it has served
ASKED: dict[str, int] = {}
PATHS = {
    "/latest/meta-data/spot/instance-action": "instance-action",
    "/latest/meta-data/events/recommendations/rebalance": "rebalance",
}


def _number(name: str, default: int) -> int:
    try:
        return int((CONTROL / name).read_text().strip())
    except (OSError, ValueError):
        return default


class Handler(http.server.BaseHTTPRequestHandler):
    def log_message(self, *args) -> None:  # quiet
        pass

    def _answer(self, status: int, body: bytes = b"") -> None:
        with LOCK, (CONTROL / "requests.log").open("a") as log:
            log.write(f"{self.command} {self.path} {status}\n")
        self.send_response(status)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_PUT(self) -> None:  # noqa: N802 - http.server's naming
        if self.path != "/latest/api/token":
            return self._answer(404)
        if not self.headers.get("X-aws-ec2-metadata-token-ttl-seconds"):
            return self._answer(400)
        token = secrets.token_hex(16)
        with LOCK:
            TOKENS[token] = 0
        self._answer(200, token.encode())

    def do_GET(self) -> None:  # noqa: N802
        token = self.headers.get("X-aws-ec2-metadata-token")
        with LOCK:
            valid = token in TOKENS and (not (CONTROL / "token-uses").exists() or TOKENS[token] < _number("token-uses", 0))
            if valid:
                TOKENS[token] += 1
        if not valid:
            return self._answer(401)
        name = PATHS.get(self.path)
        if name is None:
            return self._answer(404)
        with LOCK:
            ASKED[name] = ASKED.get(name, 0) + 1
            asked = ASKED[name]
        notice = CONTROL / f"{name}.json"
        if notice.exists() and asked > _number(f"{name}.after", 0):
            return self._answer(200, notice.read_bytes())
        self._answer(404)


if __name__ == "__main__":
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    print(server.server_address[1], flush=True)
    server.serve_forever()
