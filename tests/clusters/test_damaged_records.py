"""A damaged local state record (not JSON, or JSON of the wrong shape) affects
only its own cluster or run: other commands skip it with one warning line naming
its path, and the cluster can still be torn down from its AWS tags."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import boto3
import pytest

from gpuflow import clusters, jobs, state
from gpuflow.cli import main
from gpuflow.errors import DamagedRecord
from gpuflow.state import StateStore
from infra.sandbox import seed_deep_learning_ami
from tests.infra.cloud import REGION, leftovers, make_spec

OTHER_REGION = "eu-west-1"
REPOSITORY_ROOT = Path(__file__).resolve().parents[2]


def _record(home, name: str):
    return home / "state" / "clusters" / f"{name}.json"


def _valid(home, name: str) -> dict:
    return json.loads(_record(home, name).read_text())


def _damages(home) -> dict[str, object]:
    """Each kind of damage, as a function of the cluster's sound record."""
    return {
        "not-json": lambda sound: '{"name": "ca", "region": "eu-we',
        "a-list": lambda sound: "[]",
        "empty-object": lambda sound: "{}",
        "null": lambda sound: "null",
        "no-nodes-shape": lambda sound: json.dumps({**sound, "nodes": "i-0abc"}),
        "wrong-types": lambda sound: json.dumps({**sound, "ssh_port": "22", "sandbox": "no"}),
        "another-name": lambda sound: json.dumps({**sound, "name": "cb"}),  # writing it back would clobber cb's record
        "bad-phase": lambda sound: json.dumps({**sound, "phase": "gone?"}),
        "bad-region": lambda sound: json.dumps({**sound, "region": "../../x"}),
    }


def _run(argv: list[str], capsys) -> tuple[int, str, str]:
    state._WARNED.clear()  # a warning is said once per process: each CLI call here stands for one process
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    captured = capsys.readouterr()
    return exit_info.value.code, captured.out, captured.err


@pytest.mark.parametrize("damage", ["a-list", "another-name"])  # unreadable, and readable region (others: below)
def test_a_damaged_record_affects_only_its_own_cluster(cloud, provisioners, gpuflow_home, capsys, damage):
    seed_deep_learning_ami(OTHER_REGION)
    ca = clusters.up(make_spec("ca", region=OTHER_REGION), provisioner_factory=provisioners)
    cb = clusters.up(make_spec("cb"), provisioner_factory=provisioners)
    record = _record(gpuflow_home, "ca")
    record.write_text(_damages(gpuflow_home)[damage](_valid(gpuflow_home, "ca")))
    region_readable = damage in ("no-nodes-shape", "wrong-types", "another-name", "bad-phase")
    capsys.readouterr()

    # Commands that go through every record skip it, with one warning naming its path.
    code, out, err = _run(["ls", "--json"], capsys)
    assert code == 0, err
    listed = {item["name"]: item for item in json.loads(out)}
    assert listed["cb"]["state"] == "running" and "ca" not in listed  # not shown as `unmanaged` either
    warnings = [line for line in err.splitlines() if line.startswith("gpuflow: warning:")]
    assert len(warnings) == 1 and str(record) in warnings[0] and "damaged" in warnings[0]
    assert "gpuflow down ca" in warnings[0]

    code, out, err = _run(["reap", "--json"], capsys)
    assert code == 0, err
    assert json.loads(out)["items"] == []  # ca's live resources are not orphans
    assert str(record) in err

    code, out, err = _run(["ssh-config"], capsys)
    assert code == 0, err
    assert str(record) in err and "1 host(s): cb" in out

    # Commands on its name say it is damaged, where, and what to do; nothing is launched.
    for argv in (["status", "ca"], ["up", "ca", "--region", OTHER_REGION, "--ssh-cidr", "203.0.113.9/32"]):
        code, out, err = _run(argv, capsys)
        assert code == 8, (argv, err)
        lines = err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("gpuflow: error: state record ") and str(record) in lines[0]
        assert "damaged" in lines[0] and "gpuflow down ca" in lines[0]
        if region_readable:
            assert f"in {OTHER_REGION}" in lines[0] and "--region" not in lines[0]
        else:
            assert "gpuflow down ca --region REGION" in lines[0]
    other = boto3.client("ec2", region_name=OTHER_REGION)
    assert leftovers(cloud, gpuflow_home)["instances"] == [cb.head.instance_id]
    assert leftovers(other, gpuflow_home)["instances"] == [ca.head.instance_id]  # the refused up launched nothing
    assert len(leftovers(other, gpuflow_home)["key_pairs"]) == 1

    # Another cluster's down finishes with exit 0, whatever ca's record holds.
    code, out, err = _run(["down", "cb", "--yes"], capsys)
    assert code == 0, err
    assert "cluster cb is down" in out
    assert _valid(gpuflow_home, "cb")["phase"] == "deleted" and _valid(gpuflow_home, "cb")["name"] == "cb"

    # ca is torn down from its AWS tags: in the recorded region if readable, else where --region says.
    if not region_readable:
        code, out, err = _run(["down", "ca", "--yes"], capsys)
        assert code == 4, err
        assert f"no cluster named 'ca' in {REGION}" in err and str(record) in err and "--region" in err
    code, out, err = _run(["down", "ca", "--yes"] + ([] if region_readable else ["--region", OTHER_REGION]), capsys)
    assert code == 0, err
    assert "1 instance(s) terminated" in out
    state = other.describe_instances(InstanceIds=[ca.head.instance_id])["Reservations"][0]["Instances"][0]["State"]
    assert state["Name"] == "terminated"
    assert leftovers(other, gpuflow_home) == {} and leftovers(cloud, gpuflow_home) == {}
    assert _valid(gpuflow_home, "ca")["phase"] == "deleted"  # the damaged record is replaced by a tombstone
    code, out, err = _run(["ls"], capsys)
    assert code == 0 and "warning" not in err


def test_down_all_and_the_sandbox_check_skip_a_damaged_record(cloud, provisioners, gpuflow_home, capsys):
    clusters.up(make_spec("a1"), provisioner_factory=provisioners)
    a2 = clusters.up(make_spec("a2"), provisioner_factory=provisioners)
    _record(gpuflow_home, "a2").write_text("[]")
    stray = gpuflow_home / "state" / "clusters" / "not a record name.json"
    stray.write_text("{}")  # not a name gpuflow writes: ignored
    capsys.readouterr()
    code, out, err = _run(["down", "--all", "--yes", "--json"], capsys)
    assert code == 0, err
    assert [report["name"] for report in json.loads(out)] == ["a1"]
    assert [line for line in err.splitlines() if "warning" in line] == [
        line for line in err.splitlines() if str(_record(gpuflow_home, "a2")) in line
    ] and err.count("a2.json") == 1
    assert leftovers(cloud, gpuflow_home)["instances"] == [a2.head.instance_id]
    code, out, err = _run(["down", "a2", "--yes"], capsys)  # the configured region: where it ran
    assert code == 0, err
    stray.unlink()
    assert leftovers(cloud, gpuflow_home) == {}


@pytest.mark.parametrize("damage", ["not-json", "a-list", "empty-object", "null", "no-nodes-shape", "wrong-types",
                                    "another-name", "bad-phase", "bad-region"])
def test_every_kind_of_damage_is_one_line_naming_the_record(gpuflow_home, capsys, damage):
    sound = {"name": "ca", "region": OTHER_REGION, "instance_type": "g5.xlarge", "ami": "ami-1", "phase": "up",
             "nodes": [{"instance_id": "i-0abc", "state": "running"}]}
    record = _record(gpuflow_home, "ca")
    record.parent.mkdir(parents=True, exist_ok=True)
    record.write_text(_damages(gpuflow_home)[damage](sound))
    for argv in (["status", "ca"], ["ssh", "ca", "--", "true"], ["run", "ca", "--", "true"]):
        code, out, err = _run(argv, capsys)
        lines = err.strip().splitlines()
        assert code == 8 and len(lines) == 1, (argv, err)
        assert lines[0].startswith(f"gpuflow: error: state record {record} is damaged (") and "gpuflow down ca" in lines[0]


def test_the_store_reports_damage_by_path_and_keeps_sound_records(gpuflow_home):
    store = clusters._store()
    sound = {"name": "ok", "region": REGION, "instance_type": "g5.xlarge", "ami": "ami-1", "phase": "up"}
    store.put("ok", sound)
    for name, text in {"bad1": "{", "bad2": "[]", "bad3": '{"name": "bad3"}', "bad4": "\"x\"", "bad5": "\xff\xfe"}.items():
        store.path(name).write_bytes(text.encode("latin1"))
    documents, damaged = store.scan()
    assert documents == {"ok": sound}
    assert [record.name for record in damaged] == ["bad1", "bad2", "bad3", "bad4", "bad5"]
    assert all(str(record.path).endswith(f"{record.name}.json") for record in damaged)
    with pytest.raises(DamagedRecord, match=r"bad3\.json is damaged \(field region is missing\)"):
        store.get("bad3")
    assert StateStore(gpuflow_home, "clusters").get("ok") == sound


def test_a_damaged_run_record_affects_only_its_own_run(gpuflow_home, capsys):
    sound = jobs.RunRecord(
        run_id="20261130-100000-aaaa", cluster="gone", base_dir="/b", remote_dir="/b/runs/x", command=("python", "t.py"),
        project_dir="/p", local_dir="/p/runs/x", started_at="2026-11-30T10:00:00Z", status="succeeded", exit_code=0,
    )
    jobs.save_record(sound)
    directory = gpuflow_home / "state" / "runs"
    damaged = {
        "20261130-100001-bbbb": "{}",
        "20261130-100002-cccc": json.dumps({**sound.to_dict(), "run_id": "20261130-100002-cccc", "command": "rm -rf /"}),
        "20261130-100003-dddd": json.dumps({**sound.to_dict(), "run_id": "20261130-100000-aaaa"}),
        "20261130-100004-eeee": "not json",
    }
    for run_id, text in damaged.items():
        (directory / f"{run_id}.json").write_text(text)
    assert jobs.all_records() == [sound]
    err = capsys.readouterr().err
    assert all(f"{run_id}.json" in err for run_id in damaged) and len(err.strip().splitlines()) == len(damaged)
    code, out, err = _run(["runs", "--json"], capsys)
    assert code == 0, err
    assert [item["run_id"] for item in json.loads(out)] == [sound.run_id]
    code, out, err = _run(["logs", "20261130-100001-bbbb"], capsys)
    assert code == 8
    assert err.startswith("gpuflow: error: state record ") and "20261130-100001-bbbb.json is damaged" in err
    assert len(err.strip().splitlines()) == 1


def test_a_damaged_sandbox_record_keeps_the_sandbox_cloud_and_can_be_torn_down(gpuflow_home, tmp_path):
    from infra import sandbox

    environment = {**os.environ, "GPUFLOW_HOME": str(gpuflow_home), "PYTHONPATH": str(REPOSITORY_ROOT)}

    def gpuflow(*argv: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "gpuflow", *argv], capture_output=True, text=True,
                              env=environment, cwd=tmp_path, timeout=120)

    try:
        assert gpuflow("up", "second", "--sandbox").returncode == 0
        server = sandbox.read_server_record(gpuflow_home)
        record = _record(gpuflow_home, "second")
        sound = json.loads(record.read_text())
        record.write_text(json.dumps({"name": "second", "region": sound["region"], "sandbox": True, "nodes": 3}))
        # A look that stops the sandbox server when no sandbox cluster is known keeps it: "second" may live in it.
        dry_reap = gpuflow("reap", "--sandbox")
        assert dry_reap.returncode == 0, dry_reap.stderr
        assert str(record) in dry_reap.stderr and "damaged" in dry_reap.stderr
        assert sandbox.read_server_record(gpuflow_home) == server
        down = gpuflow("down", "second", "--yes")  # from its tags, in the sandbox the record still names
        assert down.returncode == 0, down.stderr
        assert "1 instance(s) terminated" in down.stdout
        assert json.loads(record.read_text())["phase"] == "deleted"
        # The server belongs to the `up` that started it (it exits by itself once idle); it holds nothing now.
        assert sandbox.read_server_record(gpuflow_home) == server
        assert sandbox.server_holdings(server) == {}
    finally:
        sandbox.stop_sandbox(gpuflow_home)


def test_a_damaged_sandbox_records_hint_says_sandbox(gpuflow_home, capsys):
    """The repair hint of a damaged record that still says it was a sandbox cluster
    names the sandbox: the same `down` without it would go to the real account."""
    _record(gpuflow_home, "sbx").parent.mkdir(parents=True, exist_ok=True)
    _record(gpuflow_home, "sbx").write_text(json.dumps({"name": "sbx", "region": "eu-west-1", "sandbox": True, "nodes": 3}))
    code, _, err = _run(["status", "sbx"], capsys)
    assert code == 8
    assert "`gpuflow down sbx --sandbox` tears the cluster down" in err
    _record(gpuflow_home, "aws").write_text(json.dumps({"name": "aws", "region": "eu-west-1", "sandbox": False, "nodes": 3}))
    code, _, err = _run(["status", "aws"], capsys)
    assert code == 8
    assert "`gpuflow down aws` tears the cluster down" in err
