"""A cluster's spec: the command line over the project config over defaults, validated locally."""

from __future__ import annotations

import ipaddress
import os
import re
from collections.abc import Mapping
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

from gpuflow.config import project_config
from gpuflow.errors import UsageError
from gpuflow.records import ClusterSpec
from gpuflow.state import validate_name
from gpuflow.transport.keys import check_key_permissions
from infra.userdata import validate_idle_minutes, validate_max_hours

DEFAULT_REGION = "us-east-1"
DEFAULT_INSTANCE_TYPE = "g5.xlarge"

MAX_COUNT = 64
MAX_DISK_GB = 16384

# ClusterSpec fields a project config may set (gpuflow.toml / [tool.gpuflow]).
_SPEC_CONFIG_KEYS: tuple[str, ...] = (
    "region", "instance_type", "count", "spot", "spot_fallback", "disk_gb", "idle_minutes", "max_hours", "ami",
    "key_name", "key_path", "ssh_cidr", "allow_cpu", "profile", "sandbox", "tensorflow_dlami",
)


def default_region(environ: Mapping[str, str] | None = None) -> str:
    """Project config is applied by the caller; this is the built-in chain:
    ``AWS_REGION`` / ``AWS_DEFAULT_REGION``, else us-east-1."""
    environ = os.environ if environ is None else environ
    return environ.get("AWS_REGION") or environ.get("AWS_DEFAULT_REGION") or DEFAULT_REGION


def _default_cluster_name(project_root: Path) -> str:
    cleaned = re.sub(r"[^A-Za-z0-9._-]+", "-", project_root.name).strip("-._")[:63]
    return cleaned or "gpuflow"



def resolve_spec(name: str | None = None, options: Mapping[str, Any] | None = None, *, project_dir: Path | None = None) -> ClusterSpec:
    """The ClusterSpec for ``up``: command-line ``options`` (None = not given)
    over the project config over built-in defaults; then validated."""
    config = project_config(project_dir)
    configured = {**asdict(config.cluster), "sandbox": config.sandbox}  # typed and validated by the reader
    values: dict[str, Any] = {key: configured[key] for key in _SPEC_CONFIG_KEYS if configured.get(key) is not None}
    for key, value in (options or {}).items():
        if value is not None:
            values[key] = value
    cluster_name = name or config.cluster_name or _default_cluster_name(config.root)
    values.setdefault("region", default_region())
    values.setdefault("instance_type", DEFAULT_INSTANCE_TYPE)
    known = set(ClusterSpec.__dataclass_fields__)
    unknown = set(values) - known
    if unknown:
        raise UsageError(f"unknown cluster option(s): {', '.join(sorted(unknown))}")
    return validate_spec(ClusterSpec(name=str(cluster_name), **values))


def validate_spec(spec: ClusterSpec) -> ClusterSpec:
    """Local checks (no AWS call): name, sizes, timers, CIDR.  Returns the spec
    with the CIDR normalised."""
    validate_name(spec.name, "cluster name")
    if not isinstance(spec.count, int) or isinstance(spec.count, bool) or not 1 <= spec.count <= MAX_COUNT:
        raise UsageError(f"--count must be between 1 and {MAX_COUNT}, got {spec.count!r}")
    if not isinstance(spec.disk_gb, int) or isinstance(spec.disk_gb, bool) or not 1 <= spec.disk_gb <= MAX_DISK_GB:
        raise UsageError(
            f"--disk-gb must be a whole number of GiB between 1 and {MAX_DISK_GB}, got {spec.disk_gb!r}",
            hint="the Deep Learning AMI needs about 100",
        )
    validate_idle_minutes(spec.idle_minutes)
    validate_max_hours(spec.max_hours)
    if not spec.instance_type or not re.fullmatch(r"[a-z0-9-]+\.[a-z0-9-]+", spec.instance_type):
        raise UsageError(f"invalid instance type {spec.instance_type!r}", hint="use a name such as g5.xlarge")
    if spec.key_name and not spec.key_path:
        raise UsageError("--key-name needs --key-path (the private key file of that key pair)")
    if spec.key_path and not spec.key_name:
        raise UsageError("--key-path needs --key-name (the EC2 key pair it belongs to)")
    if spec.key_path and not Path(spec.key_path).expanduser().is_file():
        raise UsageError(f"key file {spec.key_path!r} does not exist")
    if spec.key_path:
        check_key_permissions(spec.key_path)  # before anything is launched: OpenSSH would refuse it afterwards
    if spec.ssh_cidr is None:
        return spec
    return replace(spec, ssh_cidr=normalise_cidr(spec.ssh_cidr, allow_anywhere=spec.allow_ssh_from_anywhere))


def normalise_cidr(cidr: str, *, allow_anywhere: bool = False) -> str:
    """A valid IPv4/IPv6 CIDR (a bare address becomes /32 or /128); the whole
    internet only with explicit consent."""
    try:
        network = ipaddress.ip_network(cidr.strip(), strict=False)
    except ValueError as exc:
        raise UsageError(f"invalid --ssh-cidr {cidr!r}", hint="use an address range such as 203.0.113.7/32") from exc
    if network.prefixlen == 0 and not allow_anywhere:
        raise UsageError(
            f"--ssh-cidr {cidr} opens SSH to the whole internet",
            hint="pass your own address/32, or add --allow-ssh-from-anywhere if you really mean it",
        )
    return str(network)
