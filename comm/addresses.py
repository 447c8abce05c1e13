"""Where an actor's endpoints bind, and the address its peers are told (`comm.host`).

  loopback   127.0.0.1: every actor on one machine, plain TCP
  node       the actor's own Ray node address: a cluster of several nodes
  auto       loopback on a one-node cluster, node on more (the driver decides once Ray is up)
  <address>  that interface; a wildcard (0.0.0.0, ::) binds every interface, and peers are told
             the actor's node address (a wildcard cannot be connected to)

Receivers (judges, learners) bind where `bind_address` says and report the endpoint their
peers connect to; the learner group's and the weight group's rendezvous live on learner-0's
node. Off loopback the channels are CURVE-authenticated (comm.auth).
"""
import ipaddress
import os

import psutil

from comm.auth import is_loopback

HOST_POLICIES = ("auto", "loopback", "node")
LOOPBACK = "127.0.0.1"
WILDCARDS = ("0.0.0.0", "::")


def valid_host(host: str) -> bool:
    """A policy, "localhost" or an IP address."""
    if host in HOST_POLICIES or host == "localhost":
        return True
    try:
        ipaddress.ip_address(host)
        return True
    except ValueError:
        return False


def resolve_policy(host: str, node_ips: list[str]) -> str:
    """`auto` becomes loopback on a one-node cluster and node on more; anything else stays."""
    if host != "auto":
        return host
    return "node" if len(set(node_ips)) > 1 else "loopback"


def bind_address(host: str, node_ip: str) -> tuple[str, str]:
    """(where an actor on the node at `node_ip` binds, what its peers connect to) under a resolved `host`."""
    if host == "auto":
        raise ValueError("comm.host=auto is settled by the driver once Ray is up (conf.load.resolve_host); "
                         "an actor started without it needs loopback, node or an address")
    if host == "loopback":
        return LOOPBACK, LOOPBACK
    if host == "node":
        return node_ip, node_ip
    return host, node_ip if host in WILDCARDS else host


def channel_hosts(host: str, node_ips: list[str]) -> list[str]:
    """Every address an endpoint of the run may bind (the driver decides from these whether CURVE is on)."""
    return {"loopback": [LOOPBACK], "node": list(node_ips)}.get(host, [host])


def pin_gloo_interface(address: str) -> None:
    """Make gloo (the learner group, the weight group on CPU) use the interface holding `address`,
    so that peers on other nodes reach it there, not at whatever the host name resolves to."""
    if address in WILDCARDS or is_loopback(address):  # one machine: the host name's address serves
        return
    for interface, addresses in psutil.net_if_addrs().items():
        if any(a.address == address for a in addresses):
            os.environ["GLOO_SOCKET_IFNAME"] = interface
            return
    raise RuntimeError(f"no network interface of this node holds {address} (comm.host)")
