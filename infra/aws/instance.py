"""Instances in one region: launch (with zone and market fall-backs), describe, wait, terminate, console output, spot prices.

One part of :class:`infra.aws.provisioner.Ec2Provisioner` (:class:`Instances`);
account set-up around the instances is :mod:`infra.aws.config`.
"""

from __future__ import annotations

import base64
import datetime
import hashlib
from collections.abc import Callable, Sequence
from typing import Any

from infra.aws.client import AwsApi, AwsCallError, AwsCapacityError
from infra.errors import CapacityError, CloudError
from infra.records import InstanceView, LaunchRequest, LaunchResult
from infra.tags import TAG_CLUSTER, TAG_LAUNCH, TAG_MANAGED, tag_list

# How many times a launch waits for a just-made instance profile to become visible to EC2 (~40 s in all).
PROFILE_PROPAGATION_WAITS = 5

LIVE_STATES = ("pending", "running", "stopping", "stopped")
GONE_STATES = ("shutting-down", "terminated")

ProgressCallback = Callable[[str], None]

# How EC2 refuses GetConsoleOutput's Latest=True on an instance type that cannot
# give it (the latest output is a Nitro feature); "Unsupported" arrives as a capacity error.
LATEST_CONSOLE_REFUSED_CODES = frozenset(
    {
        "UnsupportedOperation",
        "Unsupported",
        "InvalidParameter",
        "InvalidParameterValue",
        "InvalidParameterCombination",
        "UnknownParameter",
    }
)


def _decoded_console(response: dict[str, Any]) -> str:
    output = response.get("Output") or ""
    try:
        return base64.b64decode(output, validate=True).decode("utf-8", errors="replace")
    except (ValueError, TypeError):
        return output  # some endpoints (moto) return it already decoded


def client_token(cluster_name: str, launch_id: str, attempt: int | str) -> str:
    """RunInstances idempotency token: the same cluster, `up` and attempt give
    the same token, so a retried call (lost response, botocore retry) cannot
    launch twice; another zone or market is another attempt (another token,
    because EC2 rejects one token with different parameters)."""
    digest = hashlib.sha256(f"{cluster_name}\0{launch_id}\0{attempt}".encode()).hexdigest()
    return f"gpuflow-{digest[:40]}"


def launch_settings(request: LaunchRequest) -> dict[str, Any]:
    """The settings every gpuflow instance is launched with, whichever way it is launched
    (RunInstances here, a launch template for EC2 Fleet in :mod:`infra.aws.fleet`): the AMI,
    key pair, security group, dead-man's switch user data (plain text: RunInstances'
    client encodes it), terminate on shutdown, IMDSv2 only with hop limit 1, an encrypted
    gp3 root volume deleted with the instance, the tags on instance and volume, and the
    instance profile when the request has one.  Neither the type, the subnet, the count
    nor the market: those are the launch's choice."""
    resource_tags = tag_list(request.tags)
    settings: dict[str, Any] = {
        "ImageId": request.image.image_id,
        "KeyName": request.key_name,
        "SecurityGroupIds": [request.security_group_id],
        "UserData": request.user_data,
        "InstanceInitiatedShutdownBehavior": "terminate",
        "MetadataOptions": {"HttpTokens": "required", "HttpPutResponseHopLimit": 1, "HttpEndpoint": "enabled"},
        "BlockDeviceMappings": [
            {
                "DeviceName": request.image.root_device_name,
                "Ebs": {
                    "VolumeSize": request.disk_gb,
                    "VolumeType": "gp3",
                    "Encrypted": True,
                    "DeleteOnTermination": True,
                },
            }
        ],
        "TagSpecifications": [
            {"ResourceType": "instance", "Tags": resource_tags + [{"Key": "Name", "Value": f"gpuflow-{request.cluster_name}"}]},
            {"ResourceType": "volume", "Tags": resource_tags},
        ],
    }
    if request.instance_profile_arn:
        settings["IamInstanceProfile"] = {"Arn": request.instance_profile_arn}
    return settings


class Instances:
    """Instance operations of one region; waits poll every ``poll_seconds``
    up to ``timeout_seconds`` on ``_clock`` (injectable: tests never wait)."""

    api: AwsApi
    region: str
    poll_seconds: float
    timeout_seconds: float
    _clock: Callable[[], float]
    _latest_console_refused: set[str]  # instances whose type refused GetConsoleOutput(Latest=True)

    def launch(self, request: LaunchRequest, *, on_attempt: ProgressCallback | None = None) -> LaunchResult:
        """RunInstances with fallbacks: each zone for spot, then (with
        ``spot_fallback``) each zone on-demand.  A capacity error moves on at
        once; any other error ends the launch."""
        if request.spot:
            markets = ("spot", "on-demand") if request.spot_fallback else ("spot",)
        else:
            markets = ("on-demand",)
        failures: list[str] = []
        attempt = 0
        for market in markets:
            for subnet_id, zone in request.subnets:
                if on_attempt:
                    on_attempt(f"launching {request.count} x {request.instance_type} ({market}) in {zone}")
                try:
                    response = self._run_instances(request, subnet_id, market, attempt)
                except AwsCapacityError as exc:
                    failures.append(f"{zone}/{market}: {exc.code}")
                    attempt += 1
                    continue
                ids = tuple(instance["InstanceId"] for instance in response.get("Instances", []))
                return LaunchResult(ids, zone, market, tuple(failures))
        raise CapacityError(
            f"no capacity for {request.count} x {request.instance_type} in {self.region} ({'; '.join(failures)})",
            hint="try later, another --region or --instance-type"
            + ("" if not request.spot or request.spot_fallback else ", or --spot-fallback"),
        )

    def _run_instances(self, request: LaunchRequest, subnet_id: str, market: str, attempt: int) -> dict[str, Any]:
        """One RunInstances.  A just-made instance profile (``gpuflow setup`` a moment ago)
        takes EC2 some seconds to see (IAM is eventually consistent): that refusal is
        waited out a bounded number of times (each retry with its own client token)."""
        waits = 0
        while True:
            token_attempt = attempt if waits == 0 else f"{attempt}-profile-{waits}"
            try:
                return self.api.call("ec2", "run_instances", **self._run_params(request, subnet_id, market, token_attempt))
            except AwsCallError as exc:
                if not (request.instance_profile_arn and waits < PROFILE_PROPAGATION_WAITS
                        and exc.code == "InvalidParameterValue" and "instance profile" in str(exc).lower()):
                    raise
                self.api.sleep(min(2.0 * 2**waits, 10.0))
                waits += 1

    def _run_params(self, request: LaunchRequest, subnet_id: str, market: str, attempt: int | str) -> dict[str, Any]:
        params = launch_settings(request)
        params.update({
            "InstanceType": request.instance_type,
            "MinCount": request.count,
            "MaxCount": request.count,
            "SubnetId": subnet_id,
            "ClientToken": client_token(request.cluster_name, request.launch_id, attempt),
        })
        if market == "spot":
            params["InstanceMarketOptions"] = {
                "MarketType": "spot",
                "SpotOptions": {"SpotInstanceType": "one-time", "InstanceInterruptionBehavior": "terminate"},
            }
            params["TagSpecifications"].append({"ResourceType": "spot-instances-request", "Tags": tag_list(request.tags)})
        return params

    def describe_instances(self, instance_ids: Sequence[str]) -> list[InstanceView]:
        """The given instances (ones EC2 no longer knows are simply absent)."""
        if not instance_ids:
            return []
        try:
            reservations = self.api.paginate("ec2", "describe_instances", "Reservations", InstanceIds=list(instance_ids))
        except AwsCallError as exc:
            if exc.code != "InvalidInstanceID.NotFound" or len(instance_ids) == 1:
                if exc.code == "InvalidInstanceID.NotFound":
                    return []
                raise
            # One unknown id fails the whole call: ask one by one.
            return [view for instance_id in instance_ids for view in self.describe_instances([instance_id])]
        return [InstanceView.from_api(instance) for reservation in reservations for instance in reservation["Instances"]]

    def find_instances(
        self, *, cluster: str | None = None, launch_id: str | None = None, states: Sequence[str] = LIVE_STATES
    ) -> list[InstanceView]:
        """Instances tagged by gpuflow (optionally of one cluster / one `up`)."""
        filters = [{"Name": f"tag:{TAG_MANAGED}", "Values": ["true"]}]
        if cluster is not None:
            filters.append({"Name": f"tag:{TAG_CLUSTER}", "Values": [cluster]})
        if launch_id is not None:
            filters.append({"Name": f"tag:{TAG_LAUNCH}", "Values": [launch_id]})
        if states:
            filters.append({"Name": "instance-state-name", "Values": list(states)})
        reservations = self.api.paginate("ec2", "describe_instances", "Reservations", Filters=filters)
        return [InstanceView.from_api(instance) for reservation in reservations for instance in reservation["Instances"]]

    def instance_status_ok(self, instance_ids: Sequence[str]) -> dict[str, bool]:
        statuses = self.api.paginate(
            "ec2", "describe_instance_status", "InstanceStatuses", InstanceIds=list(instance_ids), IncludeAllInstances=True
        )
        result = {instance_id: False for instance_id in instance_ids}
        for status in statuses:
            result[status["InstanceId"]] = (
                status.get("InstanceStatus", {}).get("Status") == "ok"
                and status.get("SystemStatus", {}).get("Status") == "ok"
            )
        return result

    def wait_until(
        self,
        instance_ids: Sequence[str],
        target: str,
        *,
        on_progress: ProgressCallback | None = None,
    ) -> list[InstanceView]:
        """Poll until every instance is ``running``, status ``ok`` (running and
        both status checks passed) or ``terminated``; return the last views.

        Raises CloudError when an instance dies while starting, or on timeout.
        """
        deadline = self._clock() + self.timeout_seconds
        while True:
            views = self.describe_instances(instance_ids)
            if target == "terminated":
                remaining = [view for view in views if view.state != "terminated"]
                done = not remaining
                summary = f"{len(instance_ids) - len(remaining)}/{len(instance_ids)} terminated"
            else:
                dead = [view for view in views if view.state in GONE_STATES or view.state in ("stopping", "stopped")]
                if dead:
                    reason = dead[0].state_reason or dead[0].state
                    raise CloudError(f"instance {dead[0].instance_id} went to {dead[0].state} while starting: {reason}")
                running = [view for view in views if view.state == "running"]
                done = len(running) == len(instance_ids)
                summary = f"{len(running)}/{len(instance_ids)} running"
                if done and target == "ok":
                    statuses = self.instance_status_ok(instance_ids)
                    passed = sum(statuses.values())
                    done = passed == len(instance_ids)
                    summary = f"{len(running)}/{len(instance_ids)} running, {passed}/{len(instance_ids)} status checks ok"
            if on_progress:
                on_progress(summary)
            if done:
                return views
            if self._clock() >= deadline:
                raise CloudError(
                    f"timed out after {self.timeout_seconds:.0f} s waiting for {target} ({summary})",
                )
            self.api.sleep(self.poll_seconds)

    def terminate(self, instance_ids: Sequence[str]) -> None:
        if not instance_ids:
            return
        try:
            self.api.call("ec2", "terminate_instances", InstanceIds=list(instance_ids))
        except AwsCallError as exc:
            if exc.code != "InvalidInstanceID.NotFound":
                raise
            for instance_id in instance_ids:  # some are already gone: terminate the rest one by one
                try:
                    self.api.call("ec2", "terminate_instances", InstanceIds=[instance_id])
                except AwsCallError as single:
                    if single.code != "InvalidInstanceID.NotFound":
                        raise

    def instance_state(self, instance_id: str) -> str:
        """'running', 'terminated', ... or 'not-found'."""
        views = self.describe_instances([instance_id])
        return views[0].state if views else "not-found"

    def console_output(self, instance_id: str) -> str:
        """The instance's serial console text (decoded), '' when none yet.

        Asks for the latest output (``Latest=True``: on Nitro instance types it
        is there at once, while the default is a buffer posted after state
        transitions, so host keys could take minutes to appear); where the API
        refuses that option (older types), asks the default way, and remembers
        the refusal for the instance."""
        try:
            if instance_id not in self._latest_console_refused:
                try:
                    return _decoded_console(
                        self.api.call("ec2", "get_console_output", InstanceId=instance_id, Latest=True)
                    )
                except (AwsCallError, AwsCapacityError) as exc:
                    if exc.code not in LATEST_CONSOLE_REFUSED_CODES:
                        raise
                    self._latest_console_refused.add(instance_id)
            return _decoded_console(self.api.call("ec2", "get_console_output", InstanceId=instance_id))
        except AwsCallError as exc:
            if exc.code == "InvalidInstanceID.NotFound":
                return ""
            raise

    def spot_price(self, instance_type: str, availability_zone: str | None) -> float | None:
        """The current spot price ($/h) of the type (in the zone when given)."""
        params: dict[str, Any] = {
            "InstanceTypes": [instance_type],
            "ProductDescriptions": ["Linux/UNIX", "Linux/UNIX (Amazon VPC)"],
            "StartTime": datetime.datetime.now(datetime.timezone.utc),
            "MaxResults": 20,
        }
        if availability_zone:
            params["AvailabilityZone"] = availability_zone
        history = self.api.call("ec2", "describe_spot_price_history", **params).get("SpotPriceHistory", [])
        in_zone = [entry for entry in history if not availability_zone or entry.get("AvailabilityZone") == availability_zone]
        entries = in_zone or history
        if not entries:
            return None
        latest = max(entries, key=lambda entry: entry.get("Timestamp") or datetime.datetime.min.replace(tzinfo=datetime.timezone.utc))
        return float(latest["SpotPrice"])

    def cancel_spot_requests(self, request_ids: Sequence[str]) -> None:
        if request_ids:
            try:
                self.api.call("ec2", "cancel_spot_instance_requests", SpotInstanceRequestIds=list(request_ids))
            except AwsCallError as exc:
                if exc.code != "InvalidSpotInstanceRequestID.NotFound":
                    raise

    def delete_volume(self, volume_id: str) -> None:
        try:
            self.api.call("ec2", "delete_volume", VolumeId=volume_id)
        except AwsCallError as exc:
            if exc.code != "InvalidVolume.NotFound":
                raise


__all__ = [
    "GONE_STATES", "LATEST_CONSOLE_REFUSED_CODES", "LIVE_STATES", "Instances", "ProgressCallback", "client_token",
    "launch_settings",
]
