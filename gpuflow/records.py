"""Frozen records passed between the layers.

"Which machine" (a :class:`Cluster` of :class:`Node` s, from the provisioner)
is kept apart from "how to reach it" (a :class:`SSHTarget`, from which the
transport layer builds a command runner), as SkyPilot's ``sky/provision`` and
``command_runner`` are.  Records serialise to plain dicts for the state cache.
"""

from __future__ import annotations

import dataclasses
import enum
import json
import math
import types
import typing
from dataclasses import dataclass
from typing import Any

from gpuflow.errors import InstanceGone
from infra.records import Node  # the cloud layer's record of one instance, re-exported


def _to_dict(record: Any) -> dict[str, Any]:
    return dataclasses.asdict(record)


def check_shape(cls: type, data: Any, where: str = "") -> None:
    """Raise TypeError unless ``data`` (decoded JSON) parses into dataclass
    ``cls``: an object with every required field, each value of its annotated
    type (a tuple is a JSON list, a nested dataclass an object).  Keys the
    dataclass does not know are left alone (other layers' bookkeeping)."""
    if not isinstance(data, dict):
        raise TypeError(f"{where or cls.__name__} is a JSON {type(data).__name__}, not an object")
    hints = typing.get_type_hints(cls)
    for field_info in dataclasses.fields(cls):
        label = f"{where}.{field_info.name}" if where else field_info.name
        if field_info.name not in data:
            required = field_info.default is dataclasses.MISSING and field_info.default_factory is dataclasses.MISSING
            if required:
                raise TypeError(f"field {label} is missing")
            continue
        if not _conforms(data[field_info.name], hints[field_info.name], label):
            raise TypeError(f"field {label} is {json.dumps(data[field_info.name])[:60]}, not {_type_name(hints[field_info.name])}")


def _conforms(value: Any, hint: Any, where: str) -> bool:
    origin = typing.get_origin(hint)
    if hint is Any:
        return True
    if hint is type(None):
        return value is None
    if origin in (typing.Union, types.UnionType):
        return any(_conforms(value, option, where) for option in typing.get_args(hint))
    if hint is bool:
        return isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if hint is str:
        return isinstance(value, str)
    if origin is tuple:
        arguments = typing.get_args(hint)
        if not isinstance(value, (list, tuple)):
            return False
        if len(arguments) == 2 and arguments[1] is Ellipsis:
            return all(_conforms(item, arguments[0], where) for item in value)
        return len(value) == len(arguments) and all(map(lambda item, option: _conforms(item, option, where), value, arguments))
    if origin is dict:
        return isinstance(value, dict)
    if dataclasses.is_dataclass(hint):
        if not isinstance(value, dict):
            return False
        check_shape(hint, value, where)  # says which nested field is wrong
        return True
    if isinstance(hint, type) and issubclass(hint, enum.Enum):  # stored as its value
        return isinstance(value, hint) or value in {member.value for member in hint}
    return isinstance(value, hint)


def _type_name(hint: Any) -> str:
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        return " or ".join(_type_name(option) for option in typing.get_args(hint))
    if hint is type(None):
        return "null"
    if typing.get_origin(hint) is tuple:
        return "a list"
    if dataclasses.is_dataclass(hint):
        return "an object"
    return getattr(hint, "__name__", None) or str(hint)


@dataclass(frozen=True)
class ClusterSpec:
    """What the user asked ``up`` for, after config and defaults are applied."""

    name: str
    region: str
    instance_type: str = "g5.xlarge"
    count: int = 1
    spot: bool = False
    spot_fallback: bool = False
    disk_gb: int = 100
    idle_minutes: int = 60
    max_hours: float = 24.0
    ami: str | None = None
    key_name: str | None = None
    key_path: str | None = None
    ssh_cidr: str | None = None
    allow_cpu: bool = False
    profile: str | None = None
    sandbox: bool = False
    allow_ssh_from_anywhere: bool = False  # a 0.0.0.0/0 or ::/0 --ssh-cidr needs this explicit consent
    tensorflow_dlami: str | None = None  # pinned TensorFlow DLAMI version (gpuflow.toml), None: the newest

    def to_dict(self) -> dict[str, Any]:
        return _to_dict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ClusterSpec:
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})


@dataclass(frozen=True)
class Cluster:
    """A named group of instances gpuflow launched, and what it created for them.

    ``key_created`` / ``security_group_created`` say whether ``down`` owns
    (and so deletes) the key pair and security group: never ones the user
    brought.
    """

    name: str
    region: str
    instance_type: str
    ami: str
    nodes: tuple[Node, ...] = ()
    key_name: str | None = None
    key_path: str | None = None  # local private key file
    key_created: bool = False
    security_group_id: str | None = None
    security_group_created: bool = False
    ssh_user: str = "ubuntu"
    ssh_port: int = 22  # sshd's port on the nodes (22 on EC2; tests point a record at a loopback sshd)
    created_at: str | None = None  # ISO 8601, UTC
    price_per_hour: float | None = None  # per instance, USD
    spec: ClusterSpec | None = None
    sandbox: bool = False
    profile: str | None = None
    ami_name: str | None = None  # the image's name (which DLAMI, which TensorFlow)
    ami_parameter: str | None = None  # the public SSM parameter the AMI was resolved from, if any
    instance_profile_arn: str | None = None  # the account stack's role the instances hold (durable runs), if any
    durable_bucket: str | None = None  # the account stack's bucket in the cluster's region, if any

    @property
    def head(self) -> Node:
        """The node jobs run on (the first one)."""
        if not self.nodes:
            raise InstanceGone(f"cluster {self.name!r} has no instances")
        return self.nodes[0]

    def to_dict(self) -> dict[str, Any]:
        data = _to_dict(self)
        data["nodes"] = [node.to_dict() for node in self.nodes]
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Cluster:
        known = {f.name for f in dataclasses.fields(cls)}
        values = {k: v for k, v in data.items() if k in known}
        values["nodes"] = tuple(Node.from_dict(node) for node in data.get("nodes", ()))
        if values.get("spec") is not None:
            values["spec"] = ClusterSpec.from_dict(values["spec"])
        return cls(**values)


@dataclass(frozen=True)
class SSHTarget:
    """How to reach one node over SSH: everything the transport needs, nothing
    about the cloud."""

    host: str
    port: int = 22
    user: str = "ubuntu"
    key_path: str | None = None
    known_hosts_path: str | None = None  # the cluster's pinned host keys
    host_key_alias: str | None = None  # name the key is pinned under (e.g. the cluster/node name)
    trust_on_first_use: bool = False


@dataclass(frozen=True)
class CommandResult:
    exit_code: int
    stdout: bytes = b""
    stderr: bytes = b""

    @property
    def ok(self) -> bool:
        return self.exit_code == 0

    def text(self) -> str:
        return self.stdout.decode("utf-8", errors="replace")

