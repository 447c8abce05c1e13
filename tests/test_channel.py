"""The trajectory channel over real ZeroMQ sockets on TCP loopback."""
import time

import msgpack
import numpy as np
import pytest
import zmq
from loguru import logger

from comm.channel import BackgroundSender, ChannelTimeout, TrajectoryReceiver, TrajectorySender
from comm.wire import SCHEMA_VERSION, Trajectory, encode_group


def make_group(prompt: int, size: int = 4, completion_length: int = 16) -> list[Trajectory]:
    return [Trajectory(
        uid=f"p{prompt}-g{group}", prompt_uid=f"p{prompt}", group=group,
        prompt_tokens=np.full(3, prompt, dtype=np.int32),
        completion_tokens=np.arange(completion_length, dtype=np.int32) + group,
        behavior_logprobs=np.full(completion_length, -0.5 * group, dtype=np.float32),
        policy_version=np.full(completion_length, prompt, dtype=np.int32),
        finish_reason="stop", task_meta={"answer": str(prompt)},
    ) for group in range(size)]


@pytest.fixture
def receiver():
    receiver = TrajectoryReceiver(hwm=8)
    yield receiver
    receiver.close()


@pytest.fixture
def raw_pusher():
    """A plain PUSH socket, to send what a TrajectorySender never would."""
    sockets = []

    def connect(endpoint: str) -> zmq.Socket:
        socket = zmq.Context.instance().socket(zmq.PUSH)
        socket.setsockopt(zmq.LINGER, 0)
        socket.connect(endpoint)
        sockets.append(socket)
        return socket

    yield connect
    for socket in sockets:
        socket.close()


def test_groups_arrive_in_order_with_their_contents(receiver):
    sender = TrajectorySender([receiver.endpoint], hwm=8, send_timeout_s=5)
    for prompt in range(5):
        sender.send_group(make_group(prompt))
    for prompt in range(5):
        group = receiver.recv_group(timeout_s=5)
        assert [t.uid for t in group] == [f"p{prompt}-g{g}" for g in range(4)]
        np.testing.assert_array_equal(group[3].completion_tokens, np.arange(16, dtype=np.int32) + 3)
        np.testing.assert_array_equal(group[2].behavior_logprobs, np.full(16, -1.0, dtype=np.float32))
        assert group[0].task_meta == {"answer": str(prompt)}
    assert receiver.recv_group(timeout_s=0.05) is None
    assert not receiver.dropped
    sender.close()


def test_malformed_messages_are_dropped_and_counted(receiver, raw_pusher):
    pusher = raw_pusher(receiver.endpoint)
    frames = encode_group(make_group(9))
    future_header = {**msgpack.unpackb(frames[0]), "v": SCHEMA_VERSION + 1}
    pusher.send(b"\xc1 garbage")
    pusher.send(b"\xc1 more garbage")
    pusher.send_multipart([msgpack.packb(future_header), *frames[1:]])
    pusher.send_multipart([frames[0], *frames[1:-1]])  # last array frame missing
    pusher.send_multipart(frames)
    warnings = []
    sink = logger.add(warnings.append, level="WARNING")
    group = receiver.recv_group(timeout_s=5)
    logger.remove(sink)
    assert [t.uid for t in group] == [f"p9-g{g}" for g in range(4)]
    assert receiver.dropped == {"not_msgpack": 2, "unknown_version": 1, "bad_frame_index": 1}
    assert len(warnings) == 3  # once per reason


def test_send_blocks_at_the_high_water_mark_then_times_out():
    receiver = TrajectoryReceiver(hwm=1)  # bound, but nobody reads
    sender = TrajectorySender([receiver.endpoint], hwm=1, send_timeout_s=1.0)
    big_group = make_group(0, size=2, completion_length=512 * 1024)  # 6 MiB per group
    sent = 0
    with pytest.raises(ChannelTimeout, match=receiver.endpoint):
        for sent in range(64):
            start = time.monotonic()
            sender.send_group(big_group)
    blocked_for = time.monotonic() - start
    assert 0.9 <= blocked_for <= 2.5, blocked_for
    assert 1 <= sent < 64  # a few groups fit in the queues and socket buffers, then it pushed back
    receiver.close()
    sender.close()


def test_groups_are_dealt_round_robin_to_two_receivers(receiver):
    other = TrajectoryReceiver(hwm=8)
    sender = TrajectorySender([receiver.endpoint, other.endpoint], hwm=8, send_timeout_s=5)
    for prompt in range(6):
        sender.send_group(make_group(prompt, size=2))
    first = [receiver.recv_group(timeout_s=5)[0].prompt_uid for _ in range(3)]
    second = [other.recv_group(timeout_s=5)[0].prompt_uid for _ in range(3)]
    assert first == ["p0", "p2", "p4"] and second == ["p1", "p3", "p5"]
    assert receiver.recv_group(timeout_s=0.05) is None and other.recv_group(timeout_s=0.05) is None
    sender.close()
    other.close()


def test_background_sender_delivers_in_order_and_follows_a_new_endpoint(receiver):
    """Groups handed over go out in order from the sender's thread; after the endpoints change,
    the next groups go to the new receiver; close sends what is still waiting."""
    other = TrajectoryReceiver(hwm=8)
    endpoints = [receiver.endpoint]
    sender = BackgroundSender(lambda: endpoints, hwm=8, send_timeout_s=5, backlog=2)
    for prompt in range(4):
        sender.send_group(make_group(prompt))
    assert [receiver.recv_group(timeout_s=5)[0].prompt_uid for _ in range(4)] == ["p0", "p1", "p2", "p3"]
    endpoints = [other.endpoint]
    for prompt in range(4, 7):
        sender.send_group(make_group(prompt))
    sender.close()
    assert [other.recv_group(timeout_s=5)[0].prompt_uid for _ in range(3)] == ["p4", "p5", "p6"]
    assert receiver.recv_group(timeout_s=0.05) is None
    other.close()


def test_background_sender_names_the_groups_its_thread_has_not_taken():
    """A receiver that reads nothing yet: a few groups fill the queues, the thread blocks in its
    send, the rest wait in the backlog and are named, newest last; once the receiver reads, none
    waits and all arrive in order."""
    receiver = TrajectoryReceiver(hwm=1)
    sender = BackgroundSender(lambda: [receiver.endpoint], hwm=1, send_timeout_s=30, backlog=64)
    for prompt in range(24):
        sender.send_group(make_group(prompt, size=2, completion_length=512 * 1024))  # 6 MiB each
    time.sleep(0.5)
    waiting = sender.waiting_prompts()
    assert 1 <= len(waiting) < 24 and waiting == [f"p{i}" for i in range(24 - len(waiting), 24)]
    assert [receiver.recv_group(timeout_s=10)[0].prompt_uid for _ in range(24)] == [f"p{i}" for i in range(24)]
    assert sender.waiting_prompts() == []
    sender.close()
    receiver.close()


def test_background_sender_raises_its_threads_timeout_to_the_caller(receiver):
    """A receiver that stops taking groups: the thread's ChannelTimeout reaches the caller through
    raise_if_failed, with nothing more handed over, then through send_group; close still returns."""
    sender = BackgroundSender(lambda: [receiver.endpoint], hwm=1, send_timeout_s=0.5, backlog=64)
    big_group = make_group(0, size=2, completion_length=512 * 1024)  # 6 MiB per group
    for _ in range(64):  # the backlog takes them all; the thread blocks after a few
        sender.send_group(big_group)
    deadline = time.monotonic() + 10
    with pytest.raises(ChannelTimeout, match=receiver.endpoint):
        while time.monotonic() < deadline:
            sender.raise_if_failed()
            time.sleep(0.05)
    with pytest.raises(ChannelTimeout):
        sender.send_group(big_group)
    start = time.monotonic()
    sender.close()
    assert time.monotonic() - start < 5
