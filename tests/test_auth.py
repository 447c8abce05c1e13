"""CURVE on the trajectory channel, over real ZeroMQ sockets.

The authenticated receiver binds 0.0.0.0 (every interface, so off loopback: keys required);
clients reach it through the same port on 127.0.0.1, which a plain client may dial.
"""
import contextlib
import dataclasses
import pickle
import threading

import pytest
import zmq

from comm.auth import ChannelKeys, run_keys
from comm.channel import ChannelTimeout, TrajectoryReceiver, TrajectorySender
from tests.test_channel import make_group

pytestmark = pytest.mark.skipif(not zmq.has("curve"), reason="libzmq built without CURVE")


def attempt(intruder: TrajectorySender, prompt: int) -> None:
    """An intruder's send: queued for a handshake that fails, or, once libzmq has given up on
    the connection, refused with ChannelTimeout. Neither is a delivery."""
    with contextlib.suppress(ChannelTimeout):
        intruder.send_group(make_group(prompt))


@pytest.fixture
def keys() -> ChannelKeys:
    return run_keys("0.0.0.0")


@pytest.fixture
def open_receiver(keys):
    receiver = TrajectoryReceiver("0.0.0.0", hwm=8, keys=keys)
    yield receiver
    receiver.close()


def test_keys_are_made_only_off_loopback():
    for host in ("127.0.0.1", "127.3.2.1", "::1", "localhost"):
        assert run_keys(host) is None, host
    first, second = run_keys("0.0.0.0"), run_keys("node-3.cluster")
    assert len({first.server_public, first.client_public, second.server_public, second.client_public}) == 4
    assert all(len(key) == 40 for key in dataclasses.astuple(first))  # Z85 of 32-byte keys
    assert pickle.loads(pickle.dumps(first)) == first  # travels through Ray as an argument
    assert first.server_secret.decode() not in repr(first) and first.client_secret.decode() not in repr(first)


def test_nobody_binds_or_dials_off_loopback_without_keys():
    with pytest.raises(ValueError, match="'0.0.0.0' is off loopback"):
        TrajectoryReceiver("0.0.0.0")
    with pytest.raises(ValueError, match="tcp://192.0.2.7:5555"):
        TrajectorySender(["tcp://127.0.0.1:5555", "tcp://192.0.2.7:5555"])


def test_only_the_runs_clients_are_admitted(open_receiver, keys):
    loopback = open_receiver.endpoint.replace("0.0.0.0", "127.0.0.1")
    stranger_public, stranger_secret = zmq.curve_keypair()
    intruders = [
        TrajectorySender([loopback], hwm=8, send_timeout_s=0.2),  # plain TCP, no CURVE at all
        TrajectorySender([open_receiver.endpoint], hwm=8, send_timeout_s=0.2,  # knows the server key only
                         keys=dataclasses.replace(keys, client_public=stranger_public, client_secret=stranger_secret)),
        TrajectorySender([open_receiver.endpoint], hwm=8, send_timeout_s=0.2, keys=run_keys("0.0.0.0")),  # another run
    ]
    for prompt, intruder in enumerate(intruders):
        attempt(intruder, prompt)
    assert open_receiver.recv_group(timeout_s=1.0) is None
    assert open_receiver.refused >= 1  # the stranger's key reached the ZAP handler and was denied

    member = TrajectorySender([open_receiver.endpoint], hwm=8, send_timeout_s=5, keys=keys)
    for prompt in (10, 11):
        member.send_group(make_group(prompt))
    for prompt in (10, 11):
        group = open_receiver.recv_group(timeout_s=5)
        assert [t.uid for t in group] == [f"p{prompt}-g{g}" for g in range(4)]
    for prompt, intruder in enumerate(intruders, start=3):  # they keep trying; the run is still served
        attempt(intruder, prompt)
    member.send_group(make_group(12))
    assert open_receiver.recv_group(timeout_s=5)[0].prompt_uid == "p12"
    assert open_receiver.recv_group(timeout_s=0.5) is None
    assert not open_receiver.dropped  # refusals happen at the handshake; no message was ever read
    for sender in (member, *intruders):
        sender.close()


def test_a_closed_receiver_leaves_no_thread_behind(keys):
    threads_before = threading.active_count()
    receivers = [TrajectoryReceiver("0.0.0.0", keys=keys) for _ in range(2)]  # one ZAP handler each
    assert threading.active_count() == threads_before + 2
    for receiver in receivers:
        receiver.close()
    assert threading.active_count() == threads_before
