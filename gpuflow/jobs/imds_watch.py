"""The spot-interruption watcher: runs on the instance, next to a run's job.

The supervisor (:mod:`gpuflow.jobs.scripts`) starts it in the background while
the job runs, as ``python -I -S -c SCRIPT RUN_DIR`` where SCRIPT is
:mod:`gpuflow.procs`' source followed by this module's (so it signals the job
only through :func:`gpuflow.procs.signal_run_group`: a process proven to be the
job, never a pid alone).  Standard library only, nothing imported from gpuflow,
runnable by the Python 3.8+ of an instance.

Every ``$GPUFLOW_IMDS_POLL_SECONDS`` (default 5) it asks the instance metadata
service, with IMDSv2 (``PUT /latest/api/token`` with a TTL header, then ``GET``
with the token; a 401 — the token expired or was refused — fetches a new token
and asks again once):

* ``/latest/meta-data/spot/instance-action``: 404 while there is no notice;
  a notice (``{"action": "terminate|stop|hibernate", "time": "...Z"}``) is
  written to ``<run>/interruption.json`` (the notice and when it was seen,
  atomically), then the job's process group gets SIGTERM, so that it saves a
  checkpoint within the ~2 minutes EC2 leaves;
* ``/latest/meta-data/events/recommendations/rebalance``: a recommendation is
  written to ``<run>/rebalance.json`` and nothing else (it is shown, not acted on).

The endpoint is ``$GPUFLOW_IMDS_ENDPOINT`` (default ``http://169.254.169.254``).
When nothing answers there (the sandbox, a laptop) or it refuses a token, the
watcher records ``{"state": "off", "reason": ...}`` in ``<run>/watcher.json``
and ends, quietly: the job never waits for it.  It touches nothing the
dead-man's switch counts as busy (no heartbeat, no job pid), lives in the
supervisor's process group (never the job's: ``gpuflow stop`` does not hit it),
and ends when its supervisor ends or the job's exit code appears.
"""

from __future__ import annotations

import datetime
import json
import math
import os
import signal
import time
import urllib.parse

IMDS_ENDPOINT_VARIABLE = "GPUFLOW_IMDS_ENDPOINT"
IMDS_DEFAULT_ENDPOINT = "http://169.254.169.254"
IMDS_INTERVAL_VARIABLE = "GPUFLOW_IMDS_POLL_SECONDS"
IMDS_DEFAULT_INTERVAL = 5.0
IMDS_TOKEN_PATH = "/latest/api/token"
IMDS_TOKEN_TTL_HEADER = "X-aws-ec2-metadata-token-ttl-seconds"
IMDS_TOKEN_HEADER = "X-aws-ec2-metadata-token"
IMDS_TOKEN_TTL_SECONDS = 21600  # the most IMDSv2 allows; renewed well before it ends, and on any 401
IMDS_TIMEOUT_SECONDS = 2.0  # per request (connect and read): an unreachable endpoint never holds anything up
IMDS_FIRST_CONTACT_ATTEMPTS = 3
INSTANCE_ACTION_PATH = "/latest/meta-data/spot/instance-action"
REBALANCE_PATH = "/latest/meta-data/events/recommendations/rebalance"
INTERRUPTION_FILE = "interruption.json"
REBALANCE_FILE = "rebalance.json"
WATCHER_FILE = "watcher.json"
EXIT_CODE_FILE = "exit_code"
# A sandbox instance's own IMDS (infra/sandbox/imds.py, ENDPOINT_NAME) writes its URL in the
# instance's base directory; the supervisor exports it as $GPUFLOW_IMDS_ENDPOINT.
NODE_ENDPOINT_FILE = "imds-endpoint"
NODE_ENDPOINT_WAIT_SECONDS = 1.0


class ImdsUnreachable(Exception):
    """Nothing answered (refused, no route, timed out, not HTTP)."""


class ImdsRefused(Exception):
    """Something answered, but gave no IMDSv2 token."""


def _utc_now_text() -> str:
    return datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def _write_json_atomically(path: str, document: dict) -> None:
    temporary = "%s.tmp.%d" % (path, os.getpid())
    with open(temporary, "w") as handle:
        json.dump(document, handle)
        handle.write("\n")
    os.replace(temporary, path)


class Imds:
    """An IMDSv2 client: one short-lived HTTP connection per request, a token reused until it is refused."""

    def __init__(self, endpoint: str, timeout: float = IMDS_TIMEOUT_SECONDS) -> None:
        parts = urllib.parse.urlsplit(endpoint)
        if parts.scheme != "http" or not parts.hostname:
            raise ValueError("%s is not an http:// endpoint" % endpoint)
        self.host = parts.hostname
        self.port = parts.port or 80
        self.timeout = timeout
        self.token = None
        self.token_at = 0.0

    def _request(self, method: str, path: str, headers: dict) -> tuple:
        import http.client  # here: gpuflow imports this module for its source, and never calls it

        connection = http.client.HTTPConnection(self.host, self.port, timeout=self.timeout)
        try:
            connection.request(method, path, headers=headers)
            response = connection.getresponse()
            return response.status, response.read(65536)
        except (OSError, http.client.HTTPException) as exc:
            raise ImdsUnreachable("%s:%d: %s" % (self.host, self.port, exc or type(exc).__name__)) from exc
        finally:
            connection.close()

    def fetch_token(self) -> None:
        status, body = self._request("PUT", IMDS_TOKEN_PATH, {IMDS_TOKEN_TTL_HEADER: str(IMDS_TOKEN_TTL_SECONDS)})
        token = body.strip().decode("ascii", "replace") if status == 200 else ""
        if not token:
            raise ImdsRefused("PUT %s answered HTTP %d without a token" % (IMDS_TOKEN_PATH, status))
        self.token, self.token_at = token, time.monotonic()

    def get(self, path: str) -> tuple:
        """(HTTP status, body) of GET ``path`` with a token; a 401 renews the token and asks once more."""
        if self.token is None or time.monotonic() - self.token_at > IMDS_TOKEN_TTL_SECONDS / 2:
            self.fetch_token()
        status, body = self._request("GET", path, {IMDS_TOKEN_HEADER: self.token})
        if status == 401:
            self.fetch_token()
            status, body = self._request("GET", path, {IMDS_TOKEN_HEADER: self.token})
        return status, body


def _parse_notice(body: bytes) -> object:
    text = body.decode("utf-8", "replace").strip()
    try:
        return json.loads(text)
    except ValueError:
        return text  # EC2 sends JSON; anything else is still a notice, kept as it came


def watch(run_dir: str, signal_job, *, endpoint: str, interval: float, still_needed) -> str:
    """Watch until ``still_needed()`` is false or a notice was acted on.

    ``signal_job()`` sends SIGTERM to the job's process group and says whether
    anything was signalled.  Returns what happened: 'off', 'acted' or 'ended'.
    """
    status_path = os.path.join(run_dir, WATCHER_FILE)

    def off(reason: str) -> str:
        _write_json_atomically(status_path, {"state": "off", "endpoint": endpoint, "reason": reason,
                                             "at": _utc_now_text()})
        return "off"

    try:
        imds = Imds(endpoint)
    except ValueError as exc:
        return off(str(exc))
    reason = ""
    for attempt in range(IMDS_FIRST_CONTACT_ATTEMPTS):
        try:
            imds.fetch_token()
            break
        except ImdsRefused as exc:
            return off(str(exc))
        except ImdsUnreachable as exc:
            reason = "unreachable: %s" % exc
            if attempt + 1 < IMDS_FIRST_CONTACT_ATTEMPTS:
                time.sleep(1.0)
            if not still_needed():
                return "ended"
    else:
        return off(reason)
    _write_json_atomically(status_path, {"state": "watching", "endpoint": endpoint, "interval_seconds": interval,
                                         "at": _utc_now_text()})
    notice_seen = rebalance_seen = False
    while still_needed():
        try:
            if not notice_seen:
                status, body = imds.get(INSTANCE_ACTION_PATH)
                if status == 200:
                    _write_json_atomically(os.path.join(run_dir, INTERRUPTION_FILE), {
                        "notice": _parse_notice(body),
                        "seen_at": _utc_now_text(),
                        "response": "SIGTERM to the job's process group: it saves a checkpoint and exits 75",
                    })
                    notice_seen = True
            if not rebalance_seen and not notice_seen:
                status, body = imds.get(REBALANCE_PATH)
                if status == 200:
                    _write_json_atomically(os.path.join(run_dir, REBALANCE_FILE), {
                        "notice": _parse_notice(body),
                        "seen_at": _utc_now_text(),
                        "response": "none (recorded and shown, not acted on)",
                    })
                    rebalance_seen = True
        except (ImdsUnreachable, ImdsRefused):
            pass  # reached once already: a passing failure, ask again at the next poll
        if notice_seen and signal_job():  # until the job has been signalled (its record may be a moment late)
            return "acted"
        deadline = time.monotonic() + interval
        while still_needed() and time.monotonic() < deadline:
            time.sleep(min(0.2, interval))
    return "ended"


def poll_interval(text) -> float:
    """``$GPUFLOW_IMDS_POLL_SECONDS`` as seconds between polls: 5 unless it is a number,
    kept within 0.05..300 (nan, which would never sleep, is no number here)."""
    try:
        interval = float(text or IMDS_DEFAULT_INTERVAL)
    except ValueError:
        return IMDS_DEFAULT_INTERVAL
    if not math.isfinite(interval):
        return IMDS_DEFAULT_INTERVAL if interval != interval else 300.0
    return min(max(interval, 0.05), 300.0)


def node_endpoint(run_dir: str, wait: float = NODE_ENDPOINT_WAIT_SECONDS):
    """The URL a sandbox instance's IMDS wrote in the base directory (``<base>/runs/<id>``'s
    ``<base>``), waiting up to ``wait`` seconds for it (its host writes it once it sees the
    instance's directory); None where there is none (an EC2 instance)."""
    path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(run_dir))), NODE_ENDPOINT_FILE)
    deadline = time.monotonic() + wait
    while True:
        try:
            with open(path) as handle:
                text = handle.read().strip()
            if text.startswith("http://"):
                return text
        except OSError:
            pass
        if time.monotonic() >= deadline:
            return None
        time.sleep(0.05)


def watch_main(argv: list, signal_run_group) -> int:
    """``RUN_DIR``: the supervisor's entry (``signal_run_group`` is :func:`gpuflow.procs.signal_run_group`)."""
    run_dir = argv[0]
    parent = os.getppid()
    endpoint = os.environ.get(IMDS_ENDPOINT_VARIABLE) or node_endpoint(run_dir) or IMDS_DEFAULT_ENDPOINT
    interval = poll_interval(os.environ.get(IMDS_INTERVAL_VARIABLE))

    def still_needed() -> bool:
        return os.getppid() == parent and not os.path.exists(os.path.join(run_dir, EXIT_CODE_FILE))

    watch(run_dir, lambda: signal_run_group(run_dir, signal.SIGTERM), endpoint=endpoint, interval=interval,
          still_needed=still_needed)
    return 0

