"""`pull` from the durable copy: only what COMMIT.json names, verified by sha256, never outside the run's directory."""

from __future__ import annotations

import json

import pytest

from gpuflow.durable import fallback, uploader
from gpuflow.durable.ref import DurableRef
from gpuflow.errors import GpuflowError, UnsafePath

REF = DurableRef(bucket="b", prefix="runs/o/r/", region="us-east-1", sandbox=True)


def _objects(files: dict[str, bytes], **changes) -> dict[str, bytes]:
    commit = uploader.commit_document(files, attempt=1, exit_code=0)
    objects = {f"runs/o/r/outputs/{name}": data for name, data in files.items()}
    objects["runs/o/r/outputs/COMMIT.json"] = json.dumps(commit).encode()
    objects["runs/o/r/log/job.log"] = b"the log\n"
    objects.update(changes)
    return objects


def test_pull_places_verified_files_and_reports_the_exit_code(tmp_path):
    objects = _objects({"metrics.json": b"{}", "curves/a.csv": b"1,2\n"})
    fetched, unchanged = fallback.pull_outputs(REF, tmp_path / "run", objects.get)
    assert sorted(fetched) == ["job.log", "outputs/curves/a.csv", "outputs/metrics.json"] and unchanged == []
    assert (tmp_path / "run" / "outputs" / "curves" / "a.csv").read_bytes() == b"1,2\n"
    assert fallback.read_exit_code(REF, objects.get) == 0
    fetched, unchanged = fallback.pull_outputs(REF, tmp_path / "run", objects.get)
    assert sorted(unchanged) == ["outputs/curves/a.csv", "outputs/metrics.json"]


def test_a_file_that_does_not_match_its_sha256_is_refused_and_not_placed(tmp_path):
    objects = _objects({"metrics.json": b"{}"}, **{"runs/o/r/outputs/metrics.json": b"{\"tampered\": 1}"})
    with pytest.raises(GpuflowError, match="metrics.json does not match its sha256"):
        fallback.pull_outputs(REF, tmp_path / "run", objects.get)
    assert not (tmp_path / "run" / "outputs" / "metrics.json").exists()


def test_a_name_that_escapes_is_refused(tmp_path):
    files = {"x": b"1"}
    objects = _objects(files)
    commit = json.loads(objects["runs/o/r/outputs/COMMIT.json"])
    commit["files"] = {"../../escape": commit["files"]["x"]}
    objects["runs/o/r/outputs/COMMIT.json"] = json.dumps(commit).encode()
    with pytest.raises(GpuflowError, match="unsafe"):
        fallback.pull_outputs(REF, tmp_path / "run", objects.get)
    assert not (tmp_path / "escape").exists()


def test_no_committed_outputs_says_so(tmp_path):
    with pytest.raises(GpuflowError, match="holds no committed outputs"):
        fallback.pull_outputs(REF, tmp_path / "run", {}.get)
    assert fallback.read_exit_code(REF, {}.get) is None
