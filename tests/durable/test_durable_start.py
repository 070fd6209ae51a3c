"""Which runs are durable, and where their sidecar sends its requests."""

from __future__ import annotations

from pathlib import Path

from gpuflow.durable import fallback, locate
from gpuflow.jobs import start
from tests.durable.durable_helpers import STORE, node_target


def test_no_store_no_durable_run(tmp_path, monkeypatch):
    monkeypatch.setattr(locate, "store_for", lambda cluster: None)
    assert start._durable_for(node_target(tmp_path), "r1") is None


def test_a_sandbox_run_uses_the_sandboxs_loopback_s3_or_is_not_durable(tmp_path, monkeypatch):
    monkeypatch.setattr(locate, "store_for", lambda cluster: STORE)
    monkeypatch.delenv("GPUFLOW_S3_ENDPOINT", raising=False)
    monkeypatch.setattr(fallback, "sandbox_endpoint", lambda: "http://127.0.0.1:4566")
    durable = start._durable_for(node_target(tmp_path), "r1")
    assert durable is not None and durable.endpoint == "http://127.0.0.1:4566"
    assert durable.ref.url.startswith(f"s3://{STORE.bucket}/runs/") and durable.ref.url.endswith("/r1/")
    # gpuflow's in-process mock: no other process can reach it, so the run is not durable (never sent elsewhere)
    monkeypatch.setattr(fallback, "sandbox_endpoint", lambda: None)
    assert start._durable_for(node_target(tmp_path), "r1") is None


def test_a_real_cluster_uses_aws_s3(tmp_path, monkeypatch):
    monkeypatch.setattr(locate, "store_for", lambda cluster: STORE)
    monkeypatch.delenv("GPUFLOW_S3_ENDPOINT", raising=False)
    monkeypatch.setattr(fallback, "sandbox_endpoint", lambda: (_ for _ in ()).throw(AssertionError("not asked")))
    durable = start._durable_for(node_target(Path(tmp_path), sandbox=False), "r1")
    assert durable is not None and durable.endpoint == "" and not durable.ref.sandbox
