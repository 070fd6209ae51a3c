"""The durable sidecar: runs on the instance next to a run's job and keeps its checkpoints, log and outputs in S3.

The supervisor (:mod:`gpuflow.jobs.scripts`) runs it as ``python -I -S -c SCRIPT
MODE RUN_DIR URL REGION`` where SCRIPT is :mod:`gpuflow.jobs.imds_watch`' source
followed by this module's (the instance-metadata client is the watcher's).
Standard library only, nothing imported from gpuflow at run time, Python 3.8+.

* ``restore`` (before the job starts): when the run directory has no complete
  checkpoint (``outputs/checkpoint/state.json`` with ``complete: true``) but the
  run's prefix holds a committed one, the newest committed checkpoint whose files
  match its ``COMMIT.json`` (size and sha256) is downloaded into a temporary
  directory and renamed into ``outputs/checkpoint`` — the training module resumes
  from it.  A checkpoint whose files do not match is refused (a line in the log)
  and the next older committed one is tried.
* ``watch`` (while the job runs): every new complete checkpoint is read (a
  consistent snapshot: ``state.json`` unchanged around the read and the
  variables' sha256 matching it), its files are uploaded under
  ``checkpoints/<seq>/`` and ``COMMIT.json`` is written last; the two newest
  committed checkpoints stay, older ones are deleted only after a newer commit.
  The log goes up every ``$GPUFLOW_DURABLE_LOG_SECONDS`` (30) — after a restore on
  another node, appended to the earlier attempts' log, so ``log/job.log`` is the whole run's.  When the
  supervisor writes ``.durable-exit`` (the job's exit code) the last checkpoint,
  the outputs (``outputs/COMMIT.json`` last), the manifest and the log go up,
  retried until ``$GPUFLOW_DURABLE_FINAL_SECONDS`` (90) have passed.

Every failure is retried with backoff and written to ``job.log`` as a
``gpuflow-durable: ...`` line; ``<run>/durable.json`` holds the state
(:class:`gpuflow.durable.status.DurableState` reads it).  A checkpoint that
never got committed is named there (``lost``) and in the log.

S3 is reached with AWS Signature Version 4 over https (path-style URLs;
``x-amz-content-sha256`` is the payload's real hash and ``x-amz-checksum-sha256``
makes S3 verify what it stores), at ``https://s3.<region>.amazonaws.com`` or
``$GPUFLOW_S3_ENDPOINT`` (plain http only for a loopback endpoint: the
sandbox's moto server).  Credentials are the instance role's, from the instance
metadata service (``$GPUFLOW_IMDS_ENDPOINT``), refreshed before they expire:
never the user's own.
"""

from __future__ import annotations

import base64
import datetime
import hashlib
import hmac
import json
import os
import shutil
import sys
import time
import urllib.parse

try:  # in the sidecar script the watcher's source comes first and defines these
    from gpuflow.jobs.imds_watch import (
        IMDS_DEFAULT_ENDPOINT,
        IMDS_ENDPOINT_VARIABLE,
        Imds,
        ImdsRefused,
        ImdsUnreachable,
        _utc_now_text,
        _write_json_atomically,
    )
except ImportError:  # pragma: no cover - the sidecar script
    pass

S3_ENDPOINT_VARIABLE = "GPUFLOW_S3_ENDPOINT"
LOG_SECONDS_VARIABLE = "GPUFLOW_DURABLE_LOG_SECONDS"
FINAL_SECONDS_VARIABLE = "GPUFLOW_DURABLE_FINAL_SECONDS"
# Test only (the interruption-during-upload proofs): ignored unless set, and unless S3 is a loopback
# endpoint (the sandbox's moto).  SECONDS: the sidecar waits that long before each object of a
# checkpoint after its first one (so an upload can be caught between its objects, COMMIT.json unsent);
# ATTEMPT: only in that attempt of the run (default: every attempt).
TEST_UPLOAD_DELAY_VARIABLE = "GPUFLOW_TEST_UPLOAD_DELAY_SECONDS"
TEST_UPLOAD_DELAY_ATTEMPT_VARIABLE = "GPUFLOW_TEST_UPLOAD_DELAY_ATTEMPT"
DEFAULT_LOG_SECONDS = 30.0
DEFAULT_FINAL_SECONDS = 90.0
RESTORE_SECONDS = 300.0  # the most a restore may take before the job starts (gpuflow waits this much longer for it)
CHECK_SECONDS = 0.5  # how often the checkpoint directory is looked at (a stat, nothing more)
BACKOFF_SECONDS = (1.0, 2.0, 4.0, 8.0, 16.0, 30.0)
REQUEST_TIMEOUT_SECONDS = 30.0
CREDENTIALS_PATH = "/latest/meta-data/iam/security-credentials/"
CREDENTIALS_REFRESH_SECONDS = 300.0  # renewed this long before they expire
KEEP_COMMITTED = 2

DURABLE_FILE = "durable.json"
EXIT_SIGNAL_FILE = ".durable-exit"
# Written by `run --recover` into the run directory of a node it relaunched the run on:
# {"attempt": N}, the attempt the job starts as there (restarts in place on that node add to it).
ATTEMPT_FILE = "attempt.json"
LOG_FILE = "job.log"
MANIFEST_FILE = "manifest.json"
OUTPUTS_DIRECTORY = "outputs"
CHECKPOINT_DIRECTORY = "checkpoint"
STATE_FILE = "state.json"
# The layout (kept equal to gpuflow/durable/__init__.py by a test: this file imports nothing from gpuflow).
CHECKPOINTS = "checkpoints/"
COMMIT_NAME = "COMMIT.json"
LOG_KEY = "log/job.log"
OUTPUTS = "outputs/"
MANIFEST_KEY = "manifest.json"
SEQ_DIGITS = 6
COMMIT_FORMAT = 1

EMPTY_SHA256 = hashlib.sha256(b"").hexdigest()


class S3Error(Exception):
    """A request to S3 failed (refused, unreachable, or no credentials)."""


# --------------------------------------------------------------------------- SigV4


def _quote(text: str, safe: str = "-_.~") -> str:
    return urllib.parse.quote(text, safe=safe)


def sign_v4(method: str, host: str, path: str, query: dict, headers: dict, payload_sha256: str,
            access_key: str, secret_key: str, token, region: str, now: datetime.datetime,
            service: str = "s3") -> dict:
    """The headers of a request signed with AWS Signature Version 4 (S3 flavour: the
    path is encoded once, never normalised).  ``headers`` are all signed, with
    ``host``, ``x-amz-date``, ``x-amz-content-sha256`` and the session token."""
    amz_date = now.strftime("%Y%m%dT%H%M%SZ")
    day = amz_date[:8]
    signed = {name.lower(): " ".join(str(value).split()) for name, value in headers.items()}
    signed["host"] = host
    signed["x-amz-date"] = amz_date
    signed["x-amz-content-sha256"] = payload_sha256
    if token:
        signed["x-amz-security-token"] = token
    names = sorted(signed)
    canonical_query = "&".join(
        "%s=%s" % (_quote(str(key)), _quote(str(value))) for key, value in sorted(query.items())
    )
    canonical = "\n".join([
        method,
        _quote(path, safe="-_.~/"),
        canonical_query,
        "".join("%s:%s\n" % (name, signed[name]) for name in names),
        ";".join(names),
        payload_sha256,
    ])
    scope = "%s/%s/%s/aws4_request" % (day, region, service)
    to_sign = "\n".join(["AWS4-HMAC-SHA256", amz_date, scope,
                         hashlib.sha256(canonical.encode("utf-8")).hexdigest()])
    key = ("AWS4" + secret_key).encode("utf-8")
    for part in (day, region, service, "aws4_request"):
        key = hmac.new(key, part.encode("utf-8"), hashlib.sha256).digest()
    signature = hmac.new(key, to_sign.encode("utf-8"), hashlib.sha256).hexdigest()
    result = dict(signed)
    result["authorization"] = "AWS4-HMAC-SHA256 Credential=%s/%s, SignedHeaders=%s, Signature=%s" % (
        access_key, scope, ";".join(names), signature)
    return result


# --------------------------------------------------------------------------- credentials


def _parse_expiration(text) -> float:
    try:
        moment = datetime.datetime.strptime(str(text), "%Y-%m-%dT%H:%M:%SZ")
    except ValueError:
        return time.time() + 2 * CREDENTIALS_REFRESH_SECONDS  # unknown: ask again soon
    return moment.replace(tzinfo=datetime.timezone.utc).timestamp()


class RoleCredentials:
    """The instance role's temporary credentials from IMDSv2, renewed before they expire."""

    def __init__(self, endpoint: str) -> None:
        self.endpoint = endpoint
        self.imds = None
        self.current = None
        self.expires = 0.0

    def get(self) -> tuple:
        if self.current is None or time.time() > self.expires - CREDENTIALS_REFRESH_SECONDS:
            self.current, self.expires = self._fetch()
        return self.current

    def _fetch(self) -> tuple:
        try:
            if self.imds is None:
                self.imds = Imds(self.endpoint)
            status, body = self.imds.get(CREDENTIALS_PATH)
            roles = body.decode("utf-8", "replace").split() if status == 200 else []
            if not roles:
                raise S3Error("the instance has no role (IMDS %s answered HTTP %d): is the account stack "
                              "deployed (`gpuflow setup`) and was the cluster started after it?"
                              % (CREDENTIALS_PATH, status))
            status, body = self.imds.get(CREDENTIALS_PATH + roles[0])
            document = json.loads(body.decode("utf-8")) if status == 200 else {}
            keys = (document.get("AccessKeyId"), document.get("SecretAccessKey"))
            if not all(keys):
                raise S3Error("the role %s has no credentials (IMDS answered HTTP %d)" % (roles[0], status))
        except (ImdsUnreachable, ImdsRefused, ValueError) as exc:
            raise S3Error("no instance role credentials from %s: %s" % (self.endpoint, exc)) from exc
        return (keys[0], keys[1], document.get("Token")), _parse_expiration(document.get("Expiration"))


# --------------------------------------------------------------------------- S3


def _is_loopback(host: str) -> bool:
    return host in ("localhost", "::1") or host.startswith("127.")


class S3:
    """Just enough of S3 for one run's prefix: put, get, list, delete (path-style URLs)."""

    def __init__(self, endpoint: str, region: str, bucket: str, credentials, timeout: float = REQUEST_TIMEOUT_SECONDS):
        parts = urllib.parse.urlsplit(endpoint)
        if parts.scheme not in ("https", "http") or not parts.hostname:
            raise ValueError("%s is not an https:// endpoint" % endpoint)
        if parts.scheme == "http" and not _is_loopback(parts.hostname):
            raise ValueError("%s: plain http only for a loopback endpoint (the sandbox)" % endpoint)
        self.scheme, self.hostname, self.port = parts.scheme, parts.hostname, parts.port
        self.host = parts.netloc
        self.region, self.bucket, self.credentials, self.timeout = region, bucket, credentials, timeout

    def request(self, method: str, key: str, query=None, body: bytes = b"", headers=None) -> tuple:
        """(status, body) of one signed request; S3Error when nothing (valid) answered."""
        # Imported here, not at the top: this module is imported by every `gpuflow run` (its
        # constants and its source, shipped to the node), which never talks to S3 itself.
        import http.client
        import ssl

        query = dict(query or {})
        path = "/%s/%s" % (self.bucket, key) if key else "/%s" % self.bucket
        payload_sha256 = hashlib.sha256(body).hexdigest()
        access_key, secret_key, token = self.credentials.get()
        signed = sign_v4(method, self.host, path, query, dict(headers or {}), payload_sha256, access_key,
                         secret_key, token, self.region, datetime.datetime.now(datetime.timezone.utc))
        target = _quote(path, safe="-_.~/")
        if query:
            target += "?" + "&".join("%s=%s" % (_quote(str(k)), _quote(str(v))) for k, v in sorted(query.items()))
        if self.scheme == "https":
            connection = http.client.HTTPSConnection(self.hostname, self.port, timeout=self.timeout,
                                                     context=ssl.create_default_context())
        else:
            connection = http.client.HTTPConnection(self.hostname, self.port, timeout=self.timeout)
        try:
            signed.pop("host")
            signed["content-length"] = str(len(body))
            connection.request(method, target, body=body, headers=signed)
            response = connection.getresponse()
            return response.status, response.read()
        except (OSError, http.client.HTTPException) as exc:
            raise S3Error("%s unreachable: %s" % (self.host, exc or type(exc).__name__)) from exc
        finally:
            connection.close()

    @staticmethod
    def _refusal(method: str, key: str, status: int, body: bytes) -> S3Error:
        import xml.etree.ElementTree

        code = ""
        try:
            code = xml.etree.ElementTree.fromstring(body).findtext("Code") or ""
        except xml.etree.ElementTree.ParseError:
            pass
        return S3Error("%s s3://.../%s: HTTP %d %s" % (method, key, status, code).rstrip())

    def put(self, key: str, data: bytes) -> None:
        checksum = base64.b64encode(hashlib.sha256(data).digest()).decode("ascii")
        status, body = self.request("PUT", key, body=data, headers={"x-amz-checksum-sha256": checksum})
        if status != 200:
            raise self._refusal("PUT", key, status, body)

    def get(self, key: str):
        """The object's bytes, or None when there is none."""
        status, body = self.request("GET", key)
        if status == 404:
            return None
        if status != 200:
            raise self._refusal("GET", key, status, body)
        return body

    def delete(self, key: str) -> None:
        status, body = self.request("DELETE", key)
        if status not in (200, 204, 404):
            raise self._refusal("DELETE", key, status, body)

    def list(self, prefix: str) -> list:
        import xml.etree.ElementTree

        keys, token = [], None
        while True:
            query = {"list-type": "2", "prefix": prefix}
            if token:
                query["continuation-token"] = token
            status, body = self.request("GET", "", query=query)
            if status != 200:
                raise self._refusal("LIST", prefix, status, body)
            root = xml.etree.ElementTree.fromstring(body)
            namespace = root.tag[:root.tag.index("}") + 1] if root.tag.startswith("{") else ""
            keys.extend(item.findtext(namespace + "Key") for item in root.iter(namespace + "Contents"))
            token = root.findtext(namespace + "NextContinuationToken")
            if root.findtext(namespace + "IsTruncated") != "true" or not token:
                return keys


def parse_url(url: str) -> tuple:
    """``s3://bucket/runs/<owner>/<run>/`` as (bucket, prefix ending in /)."""
    parts = urllib.parse.urlsplit(url)
    prefix = parts.path.lstrip("/")
    if parts.scheme != "s3" or not parts.netloc or not prefix.endswith("/"):
        raise ValueError("%r is not s3://BUCKET/PREFIX/" % url)
    return parts.netloc, prefix


def default_endpoint(region: str) -> str:
    return os.environ.get(S3_ENDPOINT_VARIABLE) or "https://s3.%s.amazonaws.com" % region


# --------------------------------------------------------------------------- commits


def seq_name(seq: int) -> str:
    return "%0*d" % (SEQ_DIGITS, seq)


def commit_document(files: dict, **fields) -> dict:
    """COMMIT.json: ``files`` maps a name to its bytes."""
    document = {"format": COMMIT_FORMAT}
    document.update(fields)
    document["files"] = {name: {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}
                         for name, data in sorted(files.items())}
    return document


def checked_commit(raw: bytes) -> dict:
    """A COMMIT.json's content, or ValueError when it is not one this code reads."""
    document = json.loads(raw.decode("utf-8"))
    if not isinstance(document, dict) or document.get("format") != COMMIT_FORMAT:
        raise ValueError("COMMIT.json of format %r" % (document.get("format") if isinstance(document, dict) else None))
    files = document.get("files")
    if not isinstance(files, dict):
        raise ValueError("COMMIT.json without a files map")
    for name, entry in files.items():
        if (not isinstance(name, str) or not name or name in (".", "..") or "\\" in name or "\x00" in name
                or name.startswith("/") or any(part in ("", ".", "..") for part in name.split("/"))):
            raise ValueError("COMMIT.json names an unsafe path %r" % (name,))
        if not isinstance(entry, dict) or not isinstance(entry.get("size"), int) or \
                not isinstance(entry.get("sha256"), str):
            raise ValueError("COMMIT.json entry %r is incomplete" % (name,))
    return document


def verified(name: str, data, entry: dict) -> bytes:
    """``data`` when it is what COMMIT.json says; ValueError naming the file when not."""
    if data is None:
        raise ValueError("%s is missing" % name)
    if len(data) != entry["size"] or hashlib.sha256(data).hexdigest() != entry["sha256"]:
        raise ValueError("%s does not match its sha256 in COMMIT.json" % name)
    return data


def committed_seqs(keys: list, prefix: str) -> list:
    """The checkpoint numbers under ``prefix`` + checkpoints/ whose COMMIT.json exists, newest first."""
    seqs = set()
    for key in keys:
        rest = key[len(prefix + CHECKPOINTS):] if key.startswith(prefix + CHECKPOINTS) else ""
        number, _, name = rest.partition("/")
        if name == COMMIT_NAME and number.isdigit():
            seqs.add(int(number))
    return sorted(seqs, reverse=True)


def all_seqs(keys: list, prefix: str) -> set:
    seqs = set()
    for key in keys:
        if key.startswith(prefix + CHECKPOINTS):
            number = key[len(prefix + CHECKPOINTS):].partition("/")[0]
            if number.isdigit():
                seqs.add(int(number))
    return seqs


# --------------------------------------------------------------------------- the run directory


def _say(run_dir: str, line: str) -> None:
    """One ``gpuflow-durable: ...`` line appended to the job's log (and to stderr)."""
    text = "gpuflow-durable: %s\n" % line
    try:
        with open(os.path.join(run_dir, LOG_FILE), "a") as handle:
            handle.write(text)
    except OSError:
        pass
    sys.stderr.write(text)


def read_checkpoint(checkpoint: str):
    """A consistent snapshot of a complete checkpoint directory: (state dict, {name: bytes}), or None.

    The training module replaces the directory by a rename; the snapshot is taken only
    when state.json is the same before and after the files are read, and (when it
    names one) the variables' sha256 matches."""
    state_path = os.path.join(checkpoint, STATE_FILE)
    try:
        with open(state_path, "rb") as handle:
            before = handle.read()
        state = json.loads(before.decode("utf-8"))
        if not isinstance(state, dict) or state.get("complete") is not True:
            return None
        files = {}
        for name in sorted(os.listdir(checkpoint)):
            path = os.path.join(checkpoint, name)
            if os.path.isfile(path) and not os.path.islink(path) and not name.startswith("."):
                with open(path, "rb") as handle:
                    files[name] = handle.read()
        with open(state_path, "rb") as handle:
            after = handle.read()
    except (OSError, ValueError):
        return None
    if after != before or files.get(STATE_FILE) != before:
        return None
    wanted = state.get("variables_sha256")
    if wanted and hashlib.sha256(files.get("variables.npz", b"")).hexdigest() != wanted:
        return None
    return state, files


def output_files(run_dir: str) -> dict:
    """The job's outputs (regular files under outputs/, never the checkpoint, hidden
    entries or symlinks), relative path -> absolute path."""
    root = os.path.join(run_dir, OUTPUTS_DIRECTORY)
    found = {}
    for directory, subdirectories, names in os.walk(root):
        subdirectories[:] = sorted(name for name in subdirectories if not name.startswith(".")
                                   and not (directory == root and name == CHECKPOINT_DIRECTORY)
                                   and not os.path.islink(os.path.join(directory, name)))
        for name in sorted(names):
            path = os.path.join(directory, name)
            if name.startswith(".") or os.path.islink(path) or not os.path.isfile(path):
                continue
            found[os.path.relpath(path, root).replace(os.sep, "/")] = path
    return found


def attempt_number(run_dir: str) -> int:
    """This attempt of the run: the one its node was started for (ATTEMPT_FILE, else 1) plus
    the attempts moved aside on this node (restarts in place)."""
    first = 1
    try:
        with open(os.path.join(run_dir, ATTEMPT_FILE)) as handle:
            number = json.load(handle).get("attempt")
        if isinstance(number, int) and not isinstance(number, bool) and number >= 1:
            first = number
    except (OSError, ValueError, AttributeError):
        pass
    try:
        return first + len([name for name in os.listdir(os.path.join(run_dir, "attempts")) if name.isdigit()])
    except OSError:
        return first


def _position(state: dict) -> str:
    return "epoch %s step %s" % (state.get("epoch"), state.get("step"))


# --------------------------------------------------------------------------- restore


def restore(run_dir: str, s3: S3, prefix: str) -> dict:
    """Bring the newest committed checkpoint into ``outputs/checkpoint`` when there is none here."""
    output = os.path.join(run_dir, OUTPUTS_DIRECTORY)
    final = os.path.join(output, CHECKPOINT_DIRECTORY)
    if read_checkpoint(final) is not None:
        return {"restore": "not needed", "reason": "a complete checkpoint is here"}
    where = "s3://%s/%s" % (s3.bucket, prefix)
    seqs = committed_seqs(s3.list(prefix + CHECKPOINTS), prefix)
    if not seqs:
        return {"restore": "nothing", "reason": "no committed checkpoint under %s" % where}
    deadline = time.monotonic() + RESTORE_SECONDS
    for seq in seqs:
        base = "%s%s%s/" % (prefix, CHECKPOINTS, seq_name(seq))
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            _say(run_dir, "no checkpoint of %s could be restored within %gs" % (where, RESTORE_SECONDS))
            break
        s3.timeout = max(1.0, min(REQUEST_TIMEOUT_SECONDS, remaining))
        try:
            commit = checked_commit(s3.get(base + COMMIT_NAME) or b"")
            files = {name: verified(name, s3.get(base + name), entry) for name, entry in commit["files"].items()}
            if any("/" in name for name in files) or STATE_FILE not in files:
                raise ValueError("a checkpoint is flat and has %s" % STATE_FILE)
        except ValueError as exc:
            _say(run_dir, "refused checkpoint %s of %s: %s; trying an older one" % (seq_name(seq), where, exc))
            continue
        os.makedirs(output, exist_ok=True)
        temporary = os.path.join(output, ".checkpoint.tmp-restore-%d" % os.getpid())
        shutil.rmtree(temporary, ignore_errors=True)
        os.makedirs(temporary)
        for name, data in files.items():
            with open(os.path.join(temporary, name), "wb") as handle:
                handle.write(data)
                handle.flush()
                os.fsync(handle.fileno())
        if os.path.exists(final):  # an incomplete or damaged one: kept aside, never overwritten in place
            os.replace(final, os.path.join(output, ".checkpoint.replaced-%d" % os.getpid()))
        os.rename(temporary, final)
        _say(run_dir, "restored checkpoint %s (%s, attempt %s) from %s" % (
            seq_name(seq), _position(commit), commit.get("attempt"), where))
        return {"restore": "restored", "seq": seq, "epoch": commit.get("epoch"), "step": commit.get("step"),
                "state_sha256": commit["files"][STATE_FILE]["sha256"], "at": _utc_now_text()}
    _say(run_dir, "no checkpoint of %s could be restored: the job starts from the beginning" % where)
    return {"restore": "refused", "reason": "every committed checkpoint failed verification"}


# --------------------------------------------------------------------------- the uploads


class Uploader:
    """The watch loop's state; every change is written to durable.json."""

    def __init__(self, run_dir: str, s3: S3, prefix: str, *, log_seconds: float, final_seconds: float) -> None:
        self.run_dir, self.s3, self.prefix = run_dir, s3, prefix
        self.where = "s3://%s/%s" % (s3.bucket, prefix)
        self.log_seconds, self.final_seconds = log_seconds, final_seconds
        self.checkpoint = os.path.join(run_dir, OUTPUTS_DIRECTORY, CHECKPOINT_DIRECTORY)
        self.attempt = attempt_number(run_dir)
        self.status = {"state": "watching", "url": self.where, "attempt": self.attempt, "committed": None,
                       "pending": None, "failures": 0, "last_error": None, "lost": None, "log_uploaded_at": None,
                       "outputs": None, "bytes_uploaded": 0, "checkpoint_bytes": [], "upload_seconds": 0.0,
                       "uploading": None}
        try:
            with open(os.path.join(run_dir, DURABLE_FILE)) as handle:
                previous = json.load(handle)
            if isinstance(previous, dict) and isinstance(previous.get("restored"), dict):
                self.status["restored"] = previous["restored"]
        except (OSError, ValueError):
            pass
        restored = self.status.get("restored") or {}
        self.uploaded_state = restored.get("state_sha256")  # what is in S3 already needs no new commit
        self.next_seq = None
        self.committed = []  # seqs committed, oldest first
        self.pending = None  # (state, files) waiting to be committed
        self.pending_key = None
        self.failures_in_row = 0
        self.next_try = 0.0
        self.log_signature = None
        self.checkpoint_signature = None
        self.exit_code = None  # the job's, once it ended (named in outputs/COMMIT.json)
        self.prior_log = None  # what log/job.log held before this attempt, when it continues another node's run
        self.test_upload_delay = 0.0  # see TEST_UPLOAD_DELAY_VARIABLE (durable_main sets it; 0 everywhere else)

    # ----------------------------------------------------------------- bookkeeping

    def save(self) -> None:
        try:
            _write_json_atomically(os.path.join(self.run_dir, DURABLE_FILE), self.status)
        except OSError:
            pass

    def failed(self, what: str, exc: Exception) -> None:
        self.failures_in_row += 1
        self.status["failures"] += 1
        self.status["last_error"] = ("%s: %s" % (what, exc))[:300]
        self.status["state"] = "failing"
        self.status["uploading"] = None  # nothing is in flight while it waits to retry
        delay = BACKOFF_SECONDS[min(self.failures_in_row - 1, len(BACKOFF_SECONDS) - 1)]
        self.next_try = time.monotonic() + delay
        _say(self.run_dir, "%s failed (%s); retrying in %gs" % (what, exc, delay))
        self.save()

    def succeeded(self) -> None:
        if self.failures_in_row:
            _say(self.run_dir, "uploads to %s work again" % self.where)
        self.failures_in_row = 0
        self.status["last_error"] = None
        self.status["state"] = "watching"

    def put(self, key: str, data: bytes) -> None:
        started = time.monotonic()
        self.s3.put(key, data)
        self.status["bytes_uploaded"] += len(data)
        self.status["upload_seconds"] = round(self.status["upload_seconds"] + time.monotonic() - started, 3)

    # ----------------------------------------------------------------- steps

    def look(self) -> None:
        """Take a new complete checkpoint as the pending one (a newer one replaces an unsent one)."""
        try:
            info = os.stat(os.path.join(self.checkpoint, STATE_FILE))
            signature = (info.st_ino, info.st_mtime_ns, info.st_size)
        except OSError:
            return
        if signature == self.checkpoint_signature:
            return
        snapshot = read_checkpoint(self.checkpoint)
        if snapshot is None:
            return  # mid-write: looked at again next time
        self.checkpoint_signature = signature
        key = hashlib.sha256(snapshot[1][STATE_FILE]).hexdigest()
        if key in (self.uploaded_state, self.pending_key):
            return
        self.pending, self.pending_key = snapshot, key
        self.status["pending"] = {"epoch": snapshot[0].get("epoch"), "step": snapshot[0].get("step")}
        self.save()

    def commit_pending(self) -> None:
        state, files = self.pending
        if self.next_seq is None:
            self.next_seq = max(all_seqs(self.s3.list(self.prefix + CHECKPOINTS), self.prefix) or {0}) + 1
            self.committed = sorted(committed_seqs(self.s3.list(self.prefix + CHECKPOINTS), self.prefix))
        seq = self.next_seq
        base = "%s%s%s/" % (self.prefix, CHECKPOINTS, seq_name(seq))
        names = sorted(files) + [COMMIT_NAME]
        # In flight, in durable.json: which checkpoint is being sent and which of its objects went up.
        uploading = {"seq": seq, "epoch": state.get("epoch"), "step": state.get("step"), "sent": [],
                     "objects": len(names), "since": _utc_now_text()}
        self.status["uploading"] = uploading
        self.save()
        for index, name in enumerate(names):
            if index and self.test_upload_delay:
                time.sleep(self.test_upload_delay)
            if name == COMMIT_NAME:  # last: only now does the checkpoint exist for a reader
                commit = commit_document(files, seq=seq, epoch=state.get("epoch"), step=state.get("step"),
                                         attempt=self.attempt, committed_at=_utc_now_text())
                self.put(base + name, (json.dumps(commit, indent=1) + "\n").encode())
            else:
                self.put(base + name, files[name])
            uploading["sent"].append(name)
            self.save()
        self.status["uploading"] = None
        self.next_seq = seq + 1
        self.committed.append(seq)
        size = sum(len(data) for data in files.values())
        self.status["checkpoint_bytes"] = (self.status["checkpoint_bytes"] + [size])[-20:]
        self.status["committed"] = {"seq": seq, "epoch": state.get("epoch"), "step": state.get("step"),
                                    "bytes": size, "at": _utc_now_text()}
        self.uploaded_state, self.pending, self.pending_key = self.pending_key, None, None
        self.status["pending"] = None
        self.save()  # committed, nothing in flight
        self.prune()

    def prune(self) -> None:
        """Older committed checkpoints go, once the newest KEEP_COMMITTED are committed (best effort)."""
        keys = self.s3.list(self.prefix + CHECKPOINTS)
        newest = committed_seqs(keys, self.prefix)[:KEEP_COMMITTED]
        if len(newest) < KEEP_COMMITTED:
            return
        oldest_kept = min(newest)
        doomed = [key for key in keys
                  if key[len(self.prefix + CHECKPOINTS):].partition("/")[0].isdigit()
                  and int(key[len(self.prefix + CHECKPOINTS):].partition("/")[0]) < oldest_kept]
        # the marker goes first, so a half-deleted checkpoint is never taken for a committed one
        for key in sorted(doomed, key=lambda k: not k.endswith("/" + COMMIT_NAME)):
            self.s3.delete(key)

    def upload_log(self, force: bool = False) -> None:
        path = os.path.join(self.run_dir, LOG_FILE)
        try:
            info = os.stat(path)
        except OSError:
            return
        signature = (info.st_size, info.st_mtime_ns)
        if signature == self.log_signature and not force:
            return
        if self.prior_log is None:  # a run restored on this node: its log in S3 so far is the earlier attempts'
            restored = (self.status.get("restored") or {}).get("restore") == "restored"
            self.prior_log = (self.s3.get(self.prefix + LOG_KEY) or b"") if restored else b""
        with open(path, "rb") as handle:
            data = handle.read()
        self.put(self.prefix + LOG_KEY, self.prior_log + data)
        self.log_signature = signature
        self.status["log_uploaded_at"] = _utc_now_text()

    def upload_outputs(self) -> None:
        files = {}
        for relative, path in output_files(self.run_dir).items():
            with open(path, "rb") as handle:
                files[relative] = handle.read()
        for relative, data in sorted(files.items()):
            self.put(self.prefix + OUTPUTS + relative, data)
        commit = commit_document(files, attempt=self.attempt, committed_at=_utc_now_text(),
                                 exit_code=self.exit_code)
        self.put(self.prefix + OUTPUTS + COMMIT_NAME, (json.dumps(commit, indent=1) + "\n").encode())
        manifest = os.path.join(self.run_dir, MANIFEST_FILE)
        if os.path.isfile(manifest):
            with open(manifest, "rb") as handle:
                self.put(self.prefix + MANIFEST_KEY, handle.read())
        self.status["outputs"] = {"files": len(files), "bytes": sum(len(d) for d in files.values()),
                                  "at": _utc_now_text()}

    # ----------------------------------------------------------------- loops

    def attempt_step(self, what: str, action, deadline=None) -> bool:
        if time.monotonic() < self.next_try:
            return False
        if deadline is not None:  # the supervisor waits for the final uploads: no request outlives the bound by much
            self.s3.timeout = max(1.0, min(REQUEST_TIMEOUT_SECONDS, deadline - time.monotonic()))
        try:
            action()
        except (S3Error, OSError, ValueError) as exc:
            self.failed(what, exc)
            return False
        self.succeeded()
        self.save()
        return True

    def run(self, finished, still_needed) -> int:
        """Watch until ``finished()`` gives the job's exit code (then the final uploads) or
        ``still_needed()`` is false (the supervisor is gone: nothing more can be done)."""
        self.save()
        next_log = time.monotonic() + self.log_seconds
        while True:
            exit_code = finished()
            if exit_code is not None:
                return self.final(exit_code)
            if not still_needed():
                return 1
            self.look()
            if self.pending is not None:
                self.attempt_step("upload of the checkpoint at %s" % _position(self.pending[0]), self.commit_pending)
            if time.monotonic() >= next_log:
                if self.attempt_step("upload of the log", self.upload_log):
                    next_log = time.monotonic() + self.log_seconds
            time.sleep(CHECK_SECONDS)

    def final(self, exit_code: str) -> int:
        self.exit_code = int(exit_code) if exit_code.lstrip("-").isdigit() else None
        deadline = time.monotonic() + self.final_seconds
        self.look()
        if exit_code == "0":  # a finished run needs no checkpoint to continue from: its outputs matter
            self.pending = self.pending_key = self.status["pending"] = None
        steps = []
        if self.pending is not None:
            steps.append(("checkpoint", "upload of the checkpoint at %s" % _position(self.pending[0]),
                          self.commit_pending))
        if exit_code == "0" or not os.path.isdir(self.checkpoint):
            steps.append(("outputs", "upload of the outputs", self.upload_outputs))
        steps.append(("log", "upload of the log", lambda: self.upload_log(force=True)))
        for kind, what, action in steps:
            self.next_try = 0.0  # each step gets at least one try, however the one before went
            while not self.attempt_step(what, action, deadline):
                if time.monotonic() >= deadline:
                    break
                time.sleep(max(0.0, min(self.next_try, deadline) - time.monotonic()))
            else:
                continue
            if kind == "checkpoint":
                committed = self.status.get("committed") or self.status.get("restored")
                since = ("the newest durable one is %s" % _position(committed)) if committed and \
                    committed.get("epoch") is not None else "no checkpoint of this run is durable"
                self.status["lost"] = dict(self.status["pending"] or {}, reason=self.status["last_error"])
                _say(self.run_dir, "LOST: the checkpoint at %s was never uploaded to %s (%s); %s" % (
                    _position(self.status["pending"] or {}), self.where, self.status["last_error"], since))
            elif kind == "outputs":
                self.status["outputs"] = {"failed": self.status["last_error"]}
                _say(self.run_dir, "LOST: the outputs were not uploaded to %s (%s)" % (
                    self.where, self.status["last_error"]))
        self.status["final_seconds"] = round(time.monotonic() - deadline + self.final_seconds, 3)
        self.status["cpu_seconds"] = round(sum(os.times()[:2]), 3)  # this sidecar's own CPU time, whole run
        self.status["state"] = "failed" if self.status["lost"] or (self.status["outputs"] or {}).get("failed") \
            else "finished"
        self.save()
        return 0 if self.status["state"] == "finished" else 1


# --------------------------------------------------------------------------- entry


def seconds(text, default: float, low: float = 0.05, high: float = 3600.0) -> float:
    try:
        value = float(text or default)
    except ValueError:
        return default
    if value != value:
        return default
    return min(max(value, low), high)


def upload_delay_for_tests(environ, s3: S3, attempt: int) -> float:
    """The test-only pause between a checkpoint's objects (TEST_UPLOAD_DELAY_VARIABLE): 0 unless
    it is set, S3 is a loopback endpoint (the sandbox) and this is the attempt it names (if any)."""
    text = environ.get(TEST_UPLOAD_DELAY_VARIABLE)
    if not text or s3.scheme != "http" or not _is_loopback(s3.hostname):
        return 0.0
    wanted = environ.get(TEST_UPLOAD_DELAY_ATTEMPT_VARIABLE)
    if wanted and wanted.strip() != str(attempt):
        return 0.0
    return seconds(text, 0.0, 0.0, 3600.0)


def durable_main(argv: list) -> int:
    """``MODE RUN_DIR URL REGION``: the supervisor's entry (MODE: restore | watch)."""
    mode, run_dir, url, region = argv[:4]
    endpoint = os.environ.get(IMDS_ENDPOINT_VARIABLE) or IMDS_DEFAULT_ENDPOINT
    try:
        bucket, prefix = parse_url(url)
        s3 = S3(default_endpoint(region), region, bucket, RoleCredentials(endpoint))
    except ValueError as exc:
        _say(run_dir, "off: %s" % exc)
        return 2
    if mode == "restore":
        try:
            outcome = restore(run_dir, s3, prefix)
        except (S3Error, OSError, ValueError) as exc:
            _say(run_dir, "could not look for a checkpoint to restore in s3://%s/%s: %s" % (bucket, prefix, exc))
            outcome = {"restore": "failed", "reason": str(exc)}
        _write_json_atomically(os.path.join(run_dir, DURABLE_FILE), {"state": "restoring", "restored": outcome})
        return 0
    parent = os.getppid()
    uploader = Uploader(run_dir, s3, prefix, log_seconds=seconds(os.environ.get(LOG_SECONDS_VARIABLE),
                                                                 DEFAULT_LOG_SECONDS),
                        final_seconds=seconds(os.environ.get(FINAL_SECONDS_VARIABLE), DEFAULT_FINAL_SECONDS, 1.0))

    uploader.test_upload_delay = upload_delay_for_tests(os.environ, s3, uploader.attempt)

    def finished():
        try:
            with open(os.path.join(run_dir, EXIT_SIGNAL_FILE)) as handle:
                return handle.read().strip() or None
        except OSError:
            return None

    return uploader.run(finished, lambda: os.getppid() == parent)
