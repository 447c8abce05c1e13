"""Addresses per actor (comm.host) and whether a cluster can hold the requested actors."""
import pytest

from comm.addresses import bind_address, channel_hosts, resolve_policy
from comm.auth import run_keys
from conf.load import ConfigError, actor_demands, check_placeable, load_config


def test_host_policies_bind_where_the_actor_lives():
    assert resolve_policy("auto", ["10.0.0.1"]) == "loopback"
    assert resolve_policy("auto", ["10.0.0.1", "10.0.0.2"]) == "node"
    assert resolve_policy("10.0.0.9", ["10.0.0.1", "10.0.0.2"]) == "10.0.0.9"
    assert bind_address("loopback", "10.0.0.2") == ("127.0.0.1", "127.0.0.1")
    assert bind_address("node", "10.0.0.2") == ("10.0.0.2", "10.0.0.2")
    assert bind_address("0.0.0.0", "10.0.0.2") == ("0.0.0.0", "10.0.0.2")  # a wildcard cannot be connected to
    assert bind_address("10.0.0.9", "10.0.0.2") == ("10.0.0.9", "10.0.0.9")


def test_curve_is_on_unless_every_endpoint_is_on_loopback():
    assert run_keys(*channel_hosts("loopback", ["10.0.0.1"])) is None
    assert run_keys(*channel_hosts("node", ["127.0.0.2", "127.0.0.3"])) is None
    assert run_keys(*channel_hosts("node", ["127.0.0.2", "10.0.0.3"])) is not None
    assert run_keys(*channel_hosts("0.0.0.0", ["127.0.0.2"])) is not None


def test_a_bad_host_or_placement_stops_at_load():
    with pytest.raises(ConfigError, match="comm.host"):
        load_config(["comm.host=node-a.cluster"])
    with pytest.raises(ConfigError, match="ray.placement"):
        load_config(["ray.placement=scatter"])


def test_demands_and_placement_on_the_nodes():
    cfg = load_config(["generator.num=2", "judge.num=2", "generator.num_gpus=0", "learner.num_gpus=0",
                       "+generator.resources.node_b=0.5"])
    demands = actor_demands(cfg)
    assert demands["generator-1"] == {"CPU": 1.0, "node_b": 0.5} and demands["judge-0"] == {"CPU": 0.25}
    two_nodes = [{"CPU": 2.0}, {"CPU": 2.0, "node_b": 1.0}]
    check_placeable(cfg, two_nodes)  # learner 1 + judges 0.5 on one node, both generators on node b
    with pytest.raises(ConfigError, match=r"cannot place generator-\d: it needs node_b 0.5 .* ask for 1 node_b, "
                                          r"the cluster's 2 nodes have 0.5"):
        check_placeable(cfg, [{"CPU": 2.0}, {"CPU": 2.0, "node_b": 0.5}])
    with pytest.raises(ConfigError, match=r"needs CPU .* ask for 3.5 CPU, the cluster's 2 nodes have 3"):
        check_placeable(cfg, [{"CPU": 1.0}, {"CPU": 2.0, "node_b": 1.0}])
