"""The sandbox cloud: the Deep Learning AMI seeding that the provisioner's AMI
lookup relies on, and the detached loopback moto server that keeps fake
clusters alive between gpuflow invocations."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import boto3
import pytest
from moto import mock_aws

from gpuflow.errors import CloudError
from infra import sandbox
from infra.sandbox import server as sandbox_server
from infra.dlami import (
    DLAMI_BASE_SSM_PARAMETER,
    DLAMI_NAME_PATTERN,
    DLAMI_OWNER_ID,
    DLAMI_SSM_PARAMETER,
)
from infra.sandbox import (
    in_process_sandbox,
    read_server_record,
    sandbox_endpoint,
    seed_deep_learning_ami,
    stop_sandbox,
)
from tests.waiting import wait_for as _wait_for

REPOSITORY_ROOT = Path(__file__).resolve().parents[2]


def _resolve_dlami(region: str, endpoint_url: str | None = None) -> tuple[str, list[str]]:
    """What the provisioner does: the SSM parameter, and the describe_images fallback."""
    ssm = boto3.client("ssm", region_name=region, endpoint_url=endpoint_url)
    ec2 = boto3.client("ec2", region_name=region, endpoint_url=endpoint_url)
    parameter_value = ssm.get_parameter(Name=DLAMI_SSM_PARAMETER)["Parameter"]["Value"]
    images = ec2.describe_images(
        Owners=[DLAMI_OWNER_ID], Filters=[{"Name": "name", "Values": [DLAMI_NAME_PATTERN]}]
    )["Images"]
    return parameter_value, [image["ImageId"] for image in images]


# --- seeding --------------------------------------------------------------------------------


def test_seeding_makes_the_dlami_resolvable_and_launchable():
    with mock_aws():
        with pytest.raises(Exception, match="ParameterNotFound"):
            _resolve_dlami("eu-west-1")  # moto alone lacks it: this is the gap being filled
        ami_id = seed_deep_learning_ami("eu-west-1")
        parameter_value, image_ids = _resolve_dlami("eu-west-1")
        assert parameter_value == ami_id
        assert image_ids == [ami_id]
        ssm = boto3.client("ssm", region_name="eu-west-1")
        assert ssm.get_parameter(Name=DLAMI_BASE_SSM_PARAMETER)["Parameter"]["Value"] == ami_id
        image = boto3.client("ec2", region_name="eu-west-1").describe_images(ImageIds=[ami_id])["Images"][0]
        assert image["OwnerId"] == DLAMI_OWNER_ID and image["Architecture"] == "x86_64"
        assert image["RootDeviceType"] == "ebs"
        launched = boto3.client("ec2", region_name="eu-west-1").run_instances(
            ImageId=ami_id, MinCount=1, MaxCount=1, InstanceType="g5.xlarge"
        )
        assert launched["Instances"][0]["ImageId"] == ami_id
        # Other regions are untouched until seeded.
        with pytest.raises(Exception, match="ParameterNotFound"):
            _resolve_dlami("us-west-2")


def test_seeding_is_idempotent():
    with mock_aws():
        first = seed_deep_learning_ami("us-east-1")
        second = seed_deep_learning_ami("us-east-1")
        assert first == second
        assert _resolve_dlami("us-east-1") == (first, [first])
        history = boto3.client("ssm", region_name="us-east-1").get_parameter_history(Name=DLAMI_SSM_PARAMETER)
        assert len(history["Parameters"]) == 1


def test_in_process_sandbox_seeds_the_requested_regions_and_any_other_on_first_use():
    with in_process_sandbox(("us-east-1", "ap-south-1")) as amis:
        assert set(amis) == {"us-east-1", "ap-south-1"}
        for region, ami_id in amis.items():
            assert _resolve_dlami(region) == (ami_id, [ami_id])
        # A region the caller did not name: seeded by its first request.
        parameter_value, image_ids = _resolve_dlami("sa-east-1")
        assert image_ids == [parameter_value] and parameter_value not in amis.values()
    # Afterwards a fresh mock holds no seeded state (nothing leaked between sandboxes).
    with mock_aws():
        with pytest.raises(Exception, match="ParameterNotFound"):
            boto3.client("ssm", region_name="sa-east-1").get_parameter(Name=DLAMI_SSM_PARAMETER)


# --- the detached server ----------------------------------------------------------------------


@pytest.fixture
def sandbox_home(tmp_path):
    home = tmp_path / "home"
    home.mkdir()
    yield home
    stop_sandbox(home)


def _listening_addresses(pid: int) -> list[str]:
    """Local addresses of the TCP sockets in LISTEN state owned by ``pid`` (Linux /proc)."""
    inodes = set()
    for descriptor in Path(f"/proc/{pid}/fd").iterdir():
        try:
            target = os.readlink(descriptor)
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(target[len("socket:[") : -1])
    addresses = []
    for table in ("tcp", "tcp6"):
        lines = Path(f"/proc/{pid}/net/{table}").read_text().splitlines()[1:]
        for line in lines:
            fields = line.split()
            local, state, inode = fields[1], fields[3], fields[9]
            if state == "0A" and inode in inodes:
                addresses.append(f"{table}:{local}")
    return addresses


def test_server_starts_on_loopback_only_and_serves_the_seeded_dlami(sandbox_home):
    url = sandbox_endpoint(sandbox_home)
    record = read_server_record(sandbox_home)
    assert record is not None and url == record.url
    assert url.startswith("http://127.0.0.1:")
    assert record.pid != os.getpid()
    port_hex = f"{record.port:04X}"
    assert _listening_addresses(record.pid) == [f"tcp:0100007F:{port_hex}"]

    # The default region is seeded at start; any other region on its first request.
    for region in ("us-east-1", "eu-central-1"):
        parameter_value, image_ids = _resolve_dlami(region, endpoint_url=url)
        assert image_ids == [parameter_value]
    log = (sandbox_home / "sandbox" / ".moto-server" / "server.log").read_text()
    assert "listening on http://127.0.0.1:" in log
    assert "GET /" not in log  # no line per request: the log stays small


def test_server_is_reused_and_keeps_state_across_processes(sandbox_home):
    program = """
import sys, boto3
from pathlib import Path
from infra.sandbox import sandbox_endpoint
url = sandbox_endpoint(Path(sys.argv[1]))
ec2 = boto3.client("ec2", region_name="us-east-1", endpoint_url=url)
if sys.argv[2] == "create":
    ec2.create_security_group(GroupName="gpuflow-kept", Description="made by process one")
names = [group["GroupName"] for group in ec2.describe_security_groups()["SecurityGroups"]]
print(url, "gpuflow-kept" in names)
"""
    environment = {**os.environ, "PYTHONPATH": str(REPOSITORY_ROOT)}

    def run(step: str) -> str:
        return subprocess.run(
            [sys.executable, "-c", program, str(sandbox_home), step],
            capture_output=True, text=True, timeout=60, env=environment, check=True,
        ).stdout.strip()

    first = run("create")
    record = read_server_record(sandbox_home)
    second = run("look")
    assert first.endswith(" True") and second.endswith(" True")
    assert first.split()[0] == second.split()[0] == record.url
    assert read_server_record(sandbox_home) == record  # the same server, not a new one
    assert sandbox_endpoint(sandbox_home) == record.url


def test_stop_ends_the_server_and_the_next_start_is_fresh(sandbox_home):
    url = sandbox_endpoint(sandbox_home)
    record = read_server_record(sandbox_home)
    boto3.client("ec2", region_name="us-east-1", endpoint_url=url).create_key_pair(KeyName="gpuflow-old")

    assert stop_sandbox(sandbox_home) is True
    assert read_server_record(sandbox_home) is None
    assert not Path(f"/proc/{record.pid}").exists()
    assert stop_sandbox(sandbox_home) is False  # idempotent

    fresh_url = sandbox_endpoint(sandbox_home)
    pairs = boto3.client("ec2", region_name="us-east-1", endpoint_url=fresh_url).describe_key_pairs()["KeyPairs"]
    assert "gpuflow-old" not in [pair["KeyName"] for pair in pairs]


def test_a_dead_server_is_replaced(sandbox_home):
    sandbox_endpoint(sandbox_home)
    dead = read_server_record(sandbox_home)
    os.kill(dead.pid, signal.SIGKILL)
    os.waitpid(dead.pid, 0)
    url = sandbox_endpoint(sandbox_home)
    replacement = read_server_record(sandbox_home)
    assert replacement.pid != dead.pid
    assert _resolve_dlami("us-east-1", endpoint_url=url)[0]


def test_a_server_that_answers_slowly_is_never_replaced(sandbox_home):
    """A live server that does not answer in time (SIGSTOP here; a loaded machine in life)
    may hold clusters: the caller gets a clear error, the server is left alone, and once it
    answers again it is reused."""
    url = sandbox_endpoint(sandbox_home)
    record = read_server_record(sandbox_home)
    boto3.client("ec2", region_name="us-east-1", endpoint_url=url).create_key_pair(KeyName="kept")
    os.kill(record.pid, signal.SIGSTOP)
    try:
        with pytest.raises(CloudError, match=f"pid {record.pid}.* does not answer"):
            sandbox_endpoint(sandbox_home, startup_timeout=1)
    finally:
        os.kill(record.pid, signal.SIGCONT)
    assert sandbox_endpoint(sandbox_home) == url and read_server_record(sandbox_home) == record
    pairs = boto3.client("ec2", region_name="us-east-1", endpoint_url=url).describe_key_pairs()["KeyPairs"]
    assert [pair["KeyName"] for pair in pairs] == ["kept"]


def test_a_record_naming_an_unrelated_process_is_never_killed(sandbox_home):
    """A stale record whose pid now belongs to someone else: start a new server,
    and leave that process alone."""
    bystander = subprocess.Popen(["sleep", "30"])
    try:
        record_path = sandbox_home / "sandbox" / ".moto-server" / "server.json"
        record_path.parent.mkdir(parents=True)
        record_path.write_text(json.dumps({"pid": bystander.pid, "port": 9, "started_at": time.time()}))
        url = sandbox_endpoint(sandbox_home)
        assert read_server_record(sandbox_home).pid != bystander.pid
        assert bystander.poll() is None
        assert stop_sandbox(sandbox_home) is True
        assert bystander.poll() is None
        assert url.startswith("http://127.0.0.1:")
    finally:
        bystander.kill()
        bystander.wait()


def test_server_identity_is_checked_before_signalling(sandbox_home, tmp_path):
    """Through /proc, and through ps where there is no /proc (macOS)."""
    sandbox_endpoint(sandbox_home)
    server = read_server_record(sandbox_home)
    bystander = subprocess.Popen(["sleep", "30"])
    try:
        for proc in (Path("/proc"), tmp_path / "no-proc"):
            assert sandbox_server._is_our_server_process(server.pid, proc=proc) is True
            assert sandbox_server._is_our_server_process(bystander.pid, proc=proc) is False
            assert sandbox_server._is_our_server_process(os.getpid(), proc=proc) is False
    finally:
        bystander.kill()
        bystander.wait()


def test_a_server_that_cannot_start_is_a_clear_error(sandbox_home, monkeypatch):
    monkeypatch.setattr(sys, "executable", "/bin/false")
    with pytest.raises(CloudError, match="sandbox cloud .* exited at start"):
        sandbox_endpoint(sandbox_home, startup_timeout=10)
    assert read_server_record(sandbox_home) is None


def test_importing_the_sandbox_and_userdata_modules_stays_cheap():
    """The CLI imports these lazily, but even then moto/boto3 load only when a
    sandbox is actually used."""
    program = (
        "import sys, infra.sandbox, infra.userdata, infra.dlami; "
        "print(sorted(m for m in ('moto', 'boto3', 'botocore', 'werkzeug', 'flask') if m in sys.modules))"
    )
    loaded = subprocess.run(
        [sys.executable, "-c", program], capture_output=True, text=True, timeout=60, check=True,
        env={**os.environ, "PYTHONPATH": str(REPOSITORY_ROOT)},
    ).stdout.strip()
    assert loaded == "[]"


# --- who starts and who stops the server; the sandbox never reaches AWS -------------------------

# The CLI in a subprocess, with a guard that refuses, and notes in $GPUFLOW_TEST_NETLOG, every
# name lookup and connection that is not loopback (the namespace has no route anyway: noting
# the lookup catches what would have gone out).
_GUARDED_CLI = r"""
import ipaddress, os, socket, sys

def _note(what):
    with open(os.environ["GPUFLOW_TEST_NETLOG"], "a") as log:
        log.write(what + "\n")

def _loopback(host):
    host = host.decode() if isinstance(host, bytes) else str(host)
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"

_getaddrinfo = socket.getaddrinfo
def getaddrinfo(host, *args, **kwargs):
    if host is not None and not _loopback(host):
        _note(f"lookup {host}")
        raise socket.gaierror(socket.EAI_NONAME, "test guard: loopback only")
    return _getaddrinfo(host, *args, **kwargs)
socket.getaddrinfo = getaddrinfo

for _name in ("connect", "connect_ex"):
    def _guarded(self, address, _real=getattr(socket.socket, _name)):
        if self.family != socket.AF_UNIX and not _loopback(address[0]):
            _note(f"connect {address!r}")
            raise ConnectionRefusedError("test guard: loopback only")
        return _real(self, address)
    setattr(socket.socket, _name, _guarded)

from gpuflow.cli import main
main(sys.argv[1:])
"""


def _serve_processes(directory: Path) -> list[int]:
    """Live (not zombie) sandbox server processes serving ``directory``."""
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            words = (entry / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if b"infra.sandbox" in words and str(directory).encode() in words:
            pids.append(int(entry.name))
    return pids


@pytest.fixture
def guarded_gpuflow(gpuflow_home, tmp_path):
    """Run the CLI in a subprocess under the network guard; returns (run, project, netlog).
    Every sandbox server of this home is stopped afterwards (this test's own)."""
    project = tmp_path / "project"
    project.mkdir()
    netlog = tmp_path / "netlog"
    environment = {
        key: value for key, value in os.environ.items() if key.lower() not in ("no_proxy", "http_proxy", "https_proxy")
    }
    environment.update(
        GPUFLOW_HOME=str(gpuflow_home),
        PYTHONPATH=str(REPOSITORY_ROOT),
        GPUFLOW_TEST_NETLOG=str(netlog),
        # Item 9: a profile that does not exist and a config file that does not parse.
        AWS_PROFILE="no-such-profile",
        AWS_CONFIG_FILE=str(tmp_path / "aws-config"),
        # A proxy from the environment must not carry sandbox traffic off loopback.
        HTTPS_PROXY="http://203.0.113.9:3128",
        HTTP_PROXY="http://203.0.113.9:3128",
        AWS_ENDPOINT_URL_SSM="https://203.0.113.9",
    )
    (tmp_path / "aws-config").write_text("[profile broken\nnot a config file\n")

    def run(*argv: str, unset: tuple[str, ...] = ()) -> subprocess.CompletedProcess:
        return subprocess.run(
            [sys.executable, "-c", _GUARDED_CLI, *argv], capture_output=True, text=True,
            env={key: value for key, value in environment.items() if key not in unset}, cwd=project, timeout=120,
        )

    yield run, project, netlog
    stop_sandbox(gpuflow_home)
    for pid in _serve_processes(gpuflow_home / "sandbox" / ".moto-server"):  # only this test's home
        os.kill(pid, signal.SIGKILL)


def _write_aws_record(home: Path, name: str) -> None:
    """A cluster of the real AWS account, as `up` records it."""
    from gpuflow.records import Cluster, Node
    from gpuflow.state import StateStore

    cluster = Cluster(name=name, region="eu-west-1", instance_type="g5.xlarge", ami="ami-0123456789abcdef0",
                      nodes=(Node("i-0123456789abcdef0", "running"),))
    StateStore(home, "clusters").put(name, {**cluster.to_dict(), "phase": "up", "launch_id": "0" * 32})


def test_a_sandbox_project_never_reaches_aws_and_its_hints_say_sandbox(guarded_gpuflow, gpuflow_home):
    """sandbox = true in gpuflow.toml: down/status/ls/reap go to the sandbox (no record needed),
    an AWS cluster known here is never asked about, every hint says --sandbox -- and no
    lookup or connection leaves loopback, even with AWS_PROFILE naming no profile (item 9)
    and a proxy in the environment."""
    run, project, netlog = guarded_gpuflow
    (project / "gpuflow.toml").write_text("sandbox = true\n")
    _write_aws_record(gpuflow_home, "billing")

    missing = run("down", "nope", "--yes")
    assert missing.returncode == 4, missing.stderr
    assert "no cluster named 'nope'" in missing.stderr and "`gpuflow ls --sandbox`" in missing.stderr
    unknown_status = run("status", "nope")
    assert unknown_status.returncode == 4 and "`gpuflow ls --sandbox`" in unknown_status.stderr

    up = run("up", "s1")
    assert up.returncode == 0, up.stderr
    assert "`gpuflow down s1 --sandbox` when done" in up.stdout
    (gpuflow_home / "state" / "clusters" / "s1.json").unlink()  # s1 is now unknown here

    listing = run("ls")
    assert listing.returncode == 0, listing.stderr
    rows = {line.split()[0]: line.split()[1] for line in listing.stdout.splitlines()[1:]}
    assert rows == {"s1": "unmanaged", "billing": "unchecked"}
    assert "`gpuflow reap --sandbox` removes" in listing.stderr
    assert "`gpuflow ls --no-sandbox` asks AWS" in listing.stderr
    dry_reap = run("reap")
    assert dry_reap.returncode == 0, dry_reap.stderr
    assert "would delete instance" in dry_reap.stdout and "cluster s1" in dry_reap.stdout
    assert "run `gpuflow reap --yes --sandbox`" in dry_reap.stderr

    for command in (("status", "billing"), ("down", "billing", "--yes")):
        refused = run(*command)
        assert refused.returncode == 2, refused.stderr
        assert "is an AWS cluster" in refused.stderr and "--no-sandbox` acts on it" in refused.stderr
    down = run("down", "s1", "--yes")  # no record: found by its tags in the sandbox
    assert down.returncode == 0 and "cluster s1 is down: 1 instance(s) terminated" in down.stdout, down.stderr
    down_all = run("down", "--all", "--yes")  # the sandbox clusters only: "billing" is not touched
    assert down_all.returncode == 0 and down_all.stdout.strip() == "no clusters", down_all.stderr
    assert json.loads((gpuflow_home / "state" / "clusters" / "billing.json").read_text())["phase"] == "up"

    assert not netlog.exists(), netlog.read_text()
    # The explicit flag decides over the project: --no-sandbox does ask AWS (and the guard sees it).
    assert run("status", "billing", "--no-sandbox", unset=("AWS_PROFILE", "AWS_CONFIG_FILE")).returncode != 0
    assert netlog.read_text()


def test_looking_at_the_sandbox_never_stops_the_server_it_did_not_start(guarded_gpuflow, gpuflow_home):
    """A dry-run reap, an ls and the documented "remove the corrupt record; ls rebuilds it"
    leave the server an earlier `up` started (and its fake clusters) alone; a command stops
    only a server it started itself, and only when the server holds nothing."""
    run, project, netlog = guarded_gpuflow
    directory = gpuflow_home / "sandbox" / ".moto-server"
    assert run("up", "keep", "--sandbox").returncode == 0
    record = read_server_record(gpuflow_home)
    ec2 = boto3.client("ec2", region_name="us-east-1", endpoint_url=record.url)

    def live_instances() -> list[str]:
        reservations = ec2.describe_instances(Filters=[{"Name": "instance-state-name", "Values": ["running"]}])
        return [instance["InstanceId"] for reservation in reservations["Reservations"] for instance in reservation["Instances"]]

    instances = live_instances()
    assert len(instances) == 1

    (gpuflow_home / "state" / "clusters" / "keep.json").unlink()  # "remove the corrupt record"
    assert "would delete instance" in run("reap", "--sandbox").stdout
    (project / "gpuflow.toml").write_text("sandbox = true\n")
    assert "unmanaged" in run("ls").stdout
    assert run("down", "gone-already", "--yes").returncode == 4  # a miss had to look too
    assert read_server_record(gpuflow_home) == record and _serve_processes(directory) == [record.pid]
    assert live_instances() == instances  # the fake cloud is intact
    holdings = sandbox.server_holdings(record)  # and the server says so itself
    assert holdings == {"instances": [f"us-east-1/{instances[0]}"], "key_pairs": holdings["key_pairs"],
                        "security_groups": holdings["security_groups"]}
    assert len(holdings["key_pairs"]) == len(holdings["security_groups"]) == 1

    # Empty now, but started by that `up`: a look still does not stop it.
    assert run("down", "keep", "--yes").returncode == 0
    assert sandbox.server_holdings(record) == {}
    assert run("ls").returncode == 0 and run("reap").returncode == 0
    assert read_server_record(gpuflow_home) == record and _serve_processes(directory) == [record.pid]
    assert not netlog.exists(), netlog.read_text()


def test_a_failed_up_stops_the_server_it_started(guarded_gpuflow, gpuflow_home):
    run, _project, _netlog = guarded_gpuflow
    failed = run("up", "bad", "--sandbox", "--ami", "ami-0123456789abcdef0")
    assert failed.returncode == 2 and "does not exist" in failed.stderr, failed.stderr
    assert read_server_record(gpuflow_home) is None
    assert _serve_processes(gpuflow_home / "sandbox" / ".moto-server") == []
    # A look that had to start the server stops it again: nothing gpuflow started is left.
    assert run("ls", "--sandbox").returncode == 0
    assert read_server_record(gpuflow_home) is None
    assert _serve_processes(gpuflow_home / "sandbox" / ".moto-server") == []


def test_sigkill_during_the_server_start_never_leaves_a_second_server(sandbox_home):
    """The starter dies after spawning the server and before its record exists: the next
    caller waits for that record and reuses the server; no unrecorded server is left."""
    directory = sandbox_home / "sandbox" / ".moto-server"
    program = "import sys; from pathlib import Path; from infra.sandbox import sandbox_endpoint; print(sandbox_endpoint(Path(sys.argv[1])))"
    environment = {**os.environ, "PYTHONPATH": str(REPOSITORY_ROOT)}
    try:
        starter = subprocess.Popen([sys.executable, "-c", program, str(sandbox_home)], env=environment,
                                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        first = _wait_for(lambda: _serve_processes(directory), timeout=60, what="the server process")
        assert read_server_record(sandbox_home) is None  # killed during the start, not after it
        starter.kill()
        starter.wait()
        url = subprocess.run([sys.executable, "-c", program, str(sandbox_home)], env=environment,
                             capture_output=True, text=True, timeout=60, check=True).stdout.strip()
        record = read_server_record(sandbox_home)
        assert _serve_processes(directory) == first == [record.pid]
        assert url == record.url
    finally:
        stop_sandbox(sandbox_home)
        for pid in _serve_processes(directory):
            os.kill(pid, signal.SIGKILL)


def test_ctrl_c_during_the_server_start_leaves_no_server(sandbox_home):
    directory = sandbox_home / "sandbox" / ".moto-server"
    program = "import sys; from pathlib import Path; from infra.sandbox import sandbox_endpoint; sandbox_endpoint(Path(sys.argv[1]))"
    try:
        starter = subprocess.Popen([sys.executable, "-c", program, str(sandbox_home)], stderr=subprocess.PIPE,
                                   env={**os.environ, "PYTHONPATH": str(REPOSITORY_ROOT)})
        _wait_for(lambda: _serve_processes(directory), timeout=60, what="the server process")
        assert read_server_record(sandbox_home) is None  # interrupted during the start
        starter.send_signal(signal.SIGINT)
        assert b"KeyboardInterrupt" in starter.communicate(timeout=60)[1]
        assert _serve_processes(directory) == []
        assert read_server_record(sandbox_home) is None
    finally:
        for pid in _serve_processes(directory):
            os.kill(pid, signal.SIGKILL)


def test_a_ctrl_c_that_arrives_as_the_server_is_spawned_leaves_no_server(sandbox_home, monkeypatch):
    """The SIGINT lands while ``Popen`` is still returning (the child already runs, the
    starter has no handle to it yet): the starter must still end that server."""
    directory = sandbox_home / "sandbox" / ".moto-server"
    real_popen = subprocess.Popen

    def popen_then_ctrl_c(*args, **kwargs):
        process = real_popen(*args, **kwargs)
        os.kill(os.getpid(), signal.SIGINT)  # delivered at the next bytecode: still inside this call
        time.sleep(0.5)
        return process

    monkeypatch.setattr(sandbox_server.subprocess, "Popen", popen_then_ctrl_c)
    try:
        with pytest.raises(KeyboardInterrupt):
            sandbox_endpoint(sandbox_home)
        assert _serve_processes(directory) == []
        assert read_server_record(sandbox_home) is None
    finally:
        for pid in _serve_processes(directory):
            os.kill(pid, signal.SIGKILL)


def test_an_orphaned_server_exits_by_itself_once_it_holds_nothing_and_no_one_uses_it(sandbox_home):
    """Its starter died without stopping it (os._exit: no atexit).  While a process uses it,
    or it holds a key pair, it stays; then it removes its record and exits."""
    directory = sandbox.server_directory(sandbox_home)
    log = directory / "server.log"
    sandbox_server._hold_as_user(directory)  # this process uses it from the start
    program = "import os, sys; from pathlib import Path; from infra.sandbox import sandbox_endpoint; sandbox_endpoint(Path(sys.argv[1])); os._exit(0)"
    subprocess.run([sys.executable, "-c", program, str(sandbox_home)], timeout=60, check=True,
                   env={**os.environ, "PYTHONPATH": str(REPOSITORY_ROOT), sandbox.ENV_IDLE_SECONDS: "0.5"})
    record = read_server_record(sandbox_home)
    ec2 = boto3.client("ec2", region_name="us-east-1", endpoint_url=record.url)
    ec2.create_key_pair(KeyName="held")
    _wait_for(lambda: "staying: in use by" in log.read_text(), timeout=60, what="the server to see its user")
    sandbox_server._release_user(directory)
    _wait_for(lambda: "staying: it holds 1 key_pairs" in log.read_text(), timeout=60, what="the server to see its key pair")
    assert _serve_processes(directory) == [record.pid]
    ec2.delete_key_pair(KeyName="held")
    _wait_for(lambda: not _serve_processes(directory), timeout=60, what="the idle server to exit")
    assert read_server_record(sandbox_home) is None


def test_sandbox_clients_refuse_anything_but_loopback(monkeypatch):
    from infra.aws.client import AwsApi, AwsTarget

    for endpoint in (None, "https://ec2.us-east-1.amazonaws.com", "http://10.0.0.1:5000"):
        with pytest.raises(CloudError, match="sandbox"):
            AwsApi(AwsTarget("us-east-1", endpoint_url=endpoint, sandbox=True)).client("ec2")
    assert AwsApi(AwsTarget("us-east-1", endpoint_url="http://127.0.0.1:1", sandbox=True)).client("ec2")


def test_the_in_process_sandbox_needs_no_aws_profile(monkeypatch, tmp_path):
    """Item 9, the one-process sandbox (run --up --sandbox --down, demo): AWS_PROFILE naming
    no profile, an unparsable config file and AWS_ENDPOINT_URL do not matter (the conftest
    guard refuses any connection off loopback)."""
    from gpuflow import clusters
    from gpuflow.records import ClusterSpec
    from infra.aws import client

    (tmp_path / "aws-config").write_text("[profile broken\n")
    monkeypatch.setenv("AWS_PROFILE", "no-such-profile")
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "aws-config"))
    # An endpoint override would take requests past the mock (moto intercepts AWS's own endpoints only).
    monkeypatch.setenv("AWS_ENDPOINT_URL", "https://203.0.113.9")
    monkeypatch.setenv("AWS_ENDPOINT_URL_EC2", "https://203.0.113.9")
    monkeypatch.setenv("MOTO_EC2_LOAD_DEFAULT_AMIS", "false")
    client.known_regions.cache_clear()
    client._shared_data_loader.cache_clear()
    with in_process_sandbox():
        cluster = clusters.up(ClusterSpec(name="noprofile", sandbox=True, region="us-east-1"))
        assert clusters.down(cluster.name).terminated


# --- terminating a sandbox instance -----------------------------------------------------------


def _sandbox_instance(ec2, cluster: str) -> dict:
    """One instance of the seeded Deep Learning AMI, tagged as ``cluster``'s."""
    image = ec2.describe_images(Owners=[DLAMI_OWNER_ID])["Images"][0]["ImageId"]
    [instance] = ec2.run_instances(
        ImageId=image, MinCount=1, MaxCount=1,
        TagSpecifications=[{"ResourceType": "instance", "Tags": [{"Key": "gpuflow:cluster", "Value": cluster}]}],
    )["Instances"]
    return instance


def test_terminating_a_sandbox_instance_ends_its_processes_and_directory(gpuflow_home):
    """The sandbox provisioner (picked once, by open_provisioner) does to a sandbox
    instance what EC2 does to a real one — also for an instance the fake cloud no
    longer knows (its server restarted), whose directory is found by its id — and
    spares a process that is not the instance's."""
    from gpuflow.provisioner import open_provisioner
    from infra.sandbox.provisioner import SandboxProvisioner

    started: list[subprocess.Popen] = []

    def process_of_run(run_dir: Path) -> subprocess.Popen:
        run_dir.mkdir(parents=True)
        process = subprocess.Popen(["sleep", "120"], env={**os.environ, "GPUFLOW_RUN_DIR": str(run_dir)},
                                   start_new_session=True)
        started.append(process)
        return process

    try:
        with in_process_sandbox():
            provisioner = open_provisioner("us-east-1", sandbox=True)
            assert isinstance(provisioner, SandboxProvisioner)
            ec2 = boto3.client("ec2", region_name="us-east-1")
            instance = _sandbox_instance(ec2, "c1")
            known = gpuflow_home / "sandbox" / "c1" / instance["InstanceId"]
            job = process_of_run(known / "runs" / "20260101-000000-aaaa")
            forgotten = gpuflow_home / "sandbox" / "c2" / "i-0123456789abcdef0"
            orphan_job = process_of_run(forgotten / "runs" / "20260101-000000-bbbb")
            bystander = process_of_run(gpuflow_home / "elsewhere" / "runs" / "x")

            provisioner.terminate([instance["InstanceId"], "i-0123456789abcdef0"])

            assert job.wait(timeout=10) == -signal.SIGKILL
            assert orphan_job.wait(timeout=10) == -signal.SIGKILL
            assert not (gpuflow_home / "sandbox" / "c1").exists()
            assert not (gpuflow_home / "sandbox" / "c2").exists()
            assert bystander.poll() is None
            state = ec2.describe_instances(InstanceIds=[instance["InstanceId"]])["Reservations"][0]["Instances"][0]
            assert state["State"]["Name"] == "terminated"
    finally:
        for process in started:
            process.kill()
            process.wait()


def test_a_sandbox_instance_dies_with_its_jobs_even_if_gpuflow_dies_mid_terminate(gpuflow_home, monkeypatch):
    """gpuflow killed between the two halves of a sandbox terminate (SIGKILL of `down`)
    must not leave a job running on an instance the fake cloud is told is terminated:
    the jobs and the directory go first, then the instance is terminated."""
    from gpuflow.provisioner import open_provisioner
    from infra.aws.provisioner import Ec2Provisioner

    started: list[subprocess.Popen] = []
    try:
        with in_process_sandbox():
            provisioner = open_provisioner("us-east-1", sandbox=True)
            ec2 = boto3.client("ec2", region_name="us-east-1")
            instance = _sandbox_instance(ec2, "c1")
            run_dir = gpuflow_home / "sandbox" / "c1" / instance["InstanceId"] / "runs" / "20260101-000000-cccc"
            run_dir.mkdir(parents=True)
            job = subprocess.Popen(["sleep", "120"], env={**os.environ, "GPUFLOW_RUN_DIR": str(run_dir)},
                                   start_new_session=True)
            started.append(job)

            def dies_here(self, instance_ids):  # gpuflow is killed as it asks EC2 to terminate
                raise SystemExit(137)

            monkeypatch.setattr(Ec2Provisioner, "terminate", dies_here)
            with pytest.raises(SystemExit):
                provisioner.terminate([instance["InstanceId"]])

            assert job.wait(timeout=10) == -signal.SIGKILL
            assert not (gpuflow_home / "sandbox" / "c1" / instance["InstanceId"]).exists()
    finally:
        for process in started:
            process.kill()
            process.wait()
