"""The node side calls a notebook started only once Jupyter itself answers, not once its port is taken."""

from __future__ import annotations

import json
import socket
import threading
from http.server import BaseHTTPRequestHandler, HTTPServer

from gpuflow.tunnels import notebook_node


def test_a_port_another_process_holds_is_not_a_started_server():
    squatter = socket.create_server(("127.0.0.1", 0))  # accepts connections, answers nothing
    try:
        port = squatter.getsockname()[1]
        assert notebook_node._answers(port, "t" * 48) is False
    finally:
        squatter.close()


def test_the_server_is_started_when_its_api_answers_with_the_token():
    token = "a" * 48

    class Jupyter(BaseHTTPRequestHandler):
        def do_GET(self):
            ours = self.path == "/api/status" and self.headers.get("Authorization") == f"token {token}"
            body = json.dumps({"started": "2026-12-01T00:00:00Z"} if ours else {"message": "Forbidden"}).encode()
            self.send_response(200 if ours else 403)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    server = HTTPServer(("127.0.0.1", 0), Jupyter)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        port = server.server_address[1]
        assert notebook_node._answers(port, token) is True
        assert notebook_node._answers(port, "b" * 48) is False  # someone else's server: not ours
    finally:
        server.shutdown()
        server.server_close()
