"""A multi-node cluster's worker network: one self-referencing rule for the worker ports, nothing else opens."""

from __future__ import annotations

import pytest

from gpuflow import clusters
from gpuflow.errors import CloudError
from infra.aws.config import WORKER_PORT_RANGE
from tests.infra.cloud import CALLER_CIDR, leftovers, make_spec, policy_allows


def _rules(cloud, group_id):
    return cloud.describe_security_groups(GroupIds=[group_id])["SecurityGroups"][0]["IpPermissions"]


def test_a_multi_node_cluster_opens_the_worker_ports_to_its_own_group_only(cloud, provisioners, api_calls):
    cluster = clusters.up(make_spec("pair", count=2), provisioner_factory=provisioners)
    assert len(cluster.nodes) == 2
    rules = sorted(_rules(cloud, cluster.security_group_id), key=lambda rule: rule["FromPort"])
    assert len(rules) == 2
    ssh, workers = rules
    assert (ssh["FromPort"], ssh["ToPort"]) == (22, 22)
    assert [item["CidrIp"] for item in ssh["IpRanges"]] == [CALLER_CIDR]
    assert (workers["IpProtocol"], workers["FromPort"], workers["ToPort"]) == ("tcp", *WORKER_PORT_RANGE)
    # from the same group, never from an address
    assert [pair["GroupId"] for pair in workers["UserIdGroupPairs"]] == [cluster.security_group_id]
    assert not workers.get("IpRanges") and not workers.get("Ipv6Ranges")
    assert api_calls.count("AuthorizeSecurityGroupIngress") == 2
    assert policy_allows("ec2", "AuthorizeSecurityGroupIngress")  # and the recorder checks every call made


def test_a_one_node_cluster_opens_nothing_but_ssh(cloud, provisioners):
    cluster = clusters.up(make_spec("single"), provisioner_factory=provisioners)
    assert [(rule["FromPort"], rule["ToPort"]) for rule in _rules(cloud, cluster.security_group_id)] == [(22, 22)]


def test_the_worker_rule_failing_leaves_nothing(cloud, provisioners, api_calls, gpuflow_home):
    api_calls.fail("AuthorizeSecurityGroupIngress", nth=1)  # the second one: the workers' rule
    with pytest.raises(CloudError, match="InjectedFailure"):
        clusters.up(make_spec("faulty-pair", count=2), provisioner_factory=provisioners)
    assert leftovers(cloud, gpuflow_home) == {}
