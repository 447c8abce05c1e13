"""The trajectory channel: GRPO groups over ZeroMQ PUSH/PULL, one group per message.

Receivers (judges, learner) bind; senders (generators, judges) connect to one or more
receivers and ZeroMQ deals whole groups among them round-robin. Queues are bounded by
high-water marks counted in messages (groups), so a slow receiver pushes back on its
senders instead of letting memory grow.

Loopback endpoints speak plain TCP. Off loopback both ends need the run's `ChannelKeys`
(comm.auth): receivers are CURVE servers that accept only the run's client key, senders are
CURVE clients; a receiver or sender off loopback without keys raises ValueError.
"""
import math
import queue
import threading
import time
from collections import Counter
from collections.abc import Callable

import zmq
from loguru import logger

from comm.auth import ChannelKeys, ClientGate, endpoint_host, require_keys, secure_client, secure_server
from comm.wire import Trajectory, WireError, decode_group, encode_group

SENDER_LINGER_MS = 2_000  # after close, how long queued groups may still be flushed to receivers
HAND_OVER_WAIT_S = 0.1  # a BackgroundSender's caller looks this often whether the thread failed


class ChannelTimeout(TimeoutError):
    """A send that waited longer than its timeout for room in any receiver's queue."""


class TrajectoryReceiver:
    """PULL end of the channel; binds `port` on `host` (0: a random free port). `endpoint` is what
    senders connect to: on `advertised_host` when given (a wildcard `host` cannot be connected to).

    A receiver replacing a dead one binds the dead one's port, so its senders reconnect to it.

    Delivery: `recv_group` blocks up to `timeout_s` and returns one decoded group, or None when
    none arrived in time. Up to `hwm` groups wait in this socket's queue (RCVHWM); when it is
    full, ZeroMQ stops reading from the senders, whose own queues then fill and block their
    `send_group`. A malformed message (not msgpack, unknown schema version, truncated or
    mis-shaped array, ...) is dropped, counted in `self.dropped[reason]` and logged at WARNING
    the first time each reason occurs; `recv_group` never raises on bad input and keeps
    waiting for a valid group until its deadline. Groups still queued at `close` are discarded
    (LINGER 0). Decoded arrays are views of the received ZeroMQ frames, not copies.

    With `keys` (required off loopback) the socket is a CURVE server in a private zmq.Context
    whose ZAP handler admits only `keys.client_public`: other clients never deliver anything.
    Handshakes with the right server key but a wrong client key are counted in `self.refused`
    (comm.auth.ClientGate); clients without CURVE or with another server key are refused inside
    libzmq, uncounted. `close` stops the handler's thread.

    Not thread-safe: create, use and close it from one thread.
    """

    def __init__(self, host: str = "127.0.0.1", hwm: int = 64, keys: ChannelKeys | None = None, port: int = 0,
                 advertised_host: str = ""):
        require_keys(host, keys, "a TrajectoryReceiver")
        self._context = zmq.Context.instance() if keys is None else zmq.Context()
        self._gate = None if keys is None else ClientGate(self._context, keys)
        self._socket = self._context.socket(zmq.PULL)
        self._socket.setsockopt(zmq.RCVHWM, hwm)
        self._socket.setsockopt(zmq.LINGER, 0)
        if keys is not None:
            secure_server(self._socket, keys)
        try:
            if port:
                self._socket.bind(f"tcp://{host}:{port}")
            else:
                port = self._socket.bind_to_random_port(f"tcp://{host}")
        except zmq.ZMQError:
            self.close()  # a CURVE receiver's ZAP thread must not outlive a failed bind
            raise
        self.endpoint = f"tcp://{advertised_host or host}:{port}"
        if self._gate is not None:
            self._gate.name = self.endpoint
        self.dropped: Counter[str] = Counter()
        logger.debug("trajectory receiver bound at {} (hwm={}, {})", self.endpoint, hwm,
                     "plain" if keys is None else "CURVE")

    @property
    def refused(self) -> int:
        """CURVE handshakes refused for a wrong client key (0 for a plain receiver)."""
        return 0 if self._gate is None else self._gate.refused

    def recv_group(self, timeout_s: float) -> list[Trajectory] | None:
        """The next valid group, or None if none arrives within `timeout_s` seconds."""
        deadline = time.monotonic() + timeout_s
        while True:
            remaining_ms = math.ceil(max(0.0, deadline - time.monotonic()) * 1000)
            if not self._socket.poll(remaining_ms, zmq.POLLIN):
                return None
            frames = self._socket.recv_multipart(copy=False)
            try:
                return decode_group([frame.buffer for frame in frames])
            except WireError as error:
                self._count_drop(error)

    def close(self) -> None:
        """Close the socket at once; queued groups are discarded. A CURVE receiver also stops its
        ZAP handler and terminates its private context."""
        self._socket.close()
        if self._gate is not None:
            self._gate.stop()
            self._context.term()

    def _count_drop(self, error: WireError) -> None:
        self.dropped[error.reason] += 1
        if self.dropped[error.reason] == 1:
            logger.warning("{} dropped a malformed message ({}); further '{}' drops are only counted",
                           self.endpoint, error, error.reason)


class TrajectorySender:
    """PUSH end of the channel; connects to every endpoint in `endpoints`.

    Delivery: each endpoint gets its own outgoing queue of up to `hwm` groups (SNDHWM) from the
    moment of connect, before the TCP connection is up; groups are dealt round-robin among the
    endpoints whose queue has room. `send_group` returns once the group is queued, not
    delivered. It blocks while every queue is full (backpressure) and raises ChannelTimeout
    after `send_timeout_s`; then the group was not queued and nothing was dropped. A queued
    group is delivered while its receiver lives; groups queued for a receiver that died are
    lost with it. After `close`, queued groups get SENDER_LINGER_MS to flush, then are dropped.

    With `keys` (required when any endpoint is off loopback) the socket is a CURVE client of the
    run. A sender that a receiver refuses (wrong keys, or none) never delivers a group there:
    libzmq either keeps retrying the handshake while groups pile up in the queue, or gives up on
    the connection; either way `send_group` ends in ChannelTimeout once no queue has room.

    The arrays of a sent group are passed to ZeroMQ without a copy: do not modify them after
    `send_group`. Not thread-safe: use from one thread.
    """

    def __init__(self, endpoints: list[str], hwm: int = 64, send_timeout_s: float = 60.0,
                 keys: ChannelKeys | None = None):
        if not endpoints:
            raise ValueError("a TrajectorySender needs at least one receiver endpoint")
        for endpoint in endpoints:
            require_keys(endpoint_host(endpoint), keys, f"a TrajectorySender connecting to {endpoint}")
        self.endpoints = list(endpoints)
        self._keys = keys
        self._send_timeout_s = send_timeout_s
        self._socket = zmq.Context.instance().socket(zmq.PUSH)
        self._socket.setsockopt(zmq.SNDHWM, hwm)
        self._socket.setsockopt(zmq.SNDTIMEO, math.ceil(send_timeout_s * 1000))
        self._socket.setsockopt(zmq.LINGER, SENDER_LINGER_MS)
        if keys is not None:
            secure_client(self._socket, keys)
        for endpoint in self.endpoints:
            self._socket.connect(endpoint)
        logger.debug("trajectory sender connected to {} (hwm={})", self.endpoints, hwm)

    def retarget(self, endpoints: list[str]) -> None:
        """Send to `endpoints` from now on: new ones are connected, those no longer listed are
        disconnected (groups still queued for them are dropped: their receiver is gone)."""
        for endpoint in endpoints:
            require_keys(endpoint_host(endpoint), self._keys, f"a TrajectorySender connecting to {endpoint}")
        for endpoint in set(self.endpoints) - set(endpoints):
            self._socket.disconnect(endpoint)
        for endpoint in [e for e in endpoints if e not in self.endpoints]:
            self._socket.connect(endpoint)
        self.endpoints = list(endpoints)
        logger.info("trajectory sender now connected to {}", self.endpoints)

    def send_group(self, trajectories: list[Trajectory]) -> None:
        """Queue one group; blocks while all receivers are full, ChannelTimeout after the timeout."""
        frames = encode_group(trajectories)
        try:
            self._socket.send_multipart(frames, copy=False)
        except zmq.Again:
            raise ChannelTimeout(
                f"send_group to {self.endpoints} timed out after {self._send_timeout_s}s: "
                "every receiver's queue is full or none is reachable") from None

    def close(self) -> None:
        """Close the socket; queued groups get SENDER_LINGER_MS to reach their receivers."""
        self._socket.close()


class BackgroundSender:
    """A TrajectorySender on a thread of its own, so that encoding and queueing a group costs
    the caller (a generator's decode loop) only a hand-off.

    Up to `backlog` groups wait for the thread; `send_group` blocks while they are all taken,
    so the channel's backpressure still reaches the caller. Groups go out in the order given,
    each to the endpoints `endpoints()` names when it is sent (a replaced judge is followed).
    The thread's failure (ChannelTimeout: no receiver took a group in time) is raised by the
    next `send_group` or `raise_if_failed`. `close` lets the thread send what is waiting, then
    closes the socket.
    """

    def __init__(self, endpoints: Callable[[], list[str]], hwm: int = 64, send_timeout_s: float = 60.0,
                 keys: ChannelKeys | None = None, backlog: int = 64, name: str = "sender"):
        self._endpoints = endpoints
        self._backlog: queue.Queue = queue.Queue(maxsize=backlog)
        self._failure: BaseException | None = None
        sender = TrajectorySender(endpoints(), hwm, send_timeout_s, keys)  # bad endpoints raise here
        self._thread = threading.Thread(target=self._run, args=(sender,), name=name, daemon=True)
        self._thread.start()

    def send_group(self, trajectories: list[Trajectory]) -> None:
        while not self._handed_over(trajectories):
            self.raise_if_failed()

    def raise_if_failed(self) -> None:
        """Raise the thread's failure, if it failed (the caller may have nothing more to send)."""
        if self._failure is not None:
            raise self._failure

    def waiting_prompts(self) -> list[str]:
        """The prompt uids of the groups handed over that the thread has not taken yet: they go to
        whichever receivers are named when it takes them, so a receiver's death cannot lose them."""
        with self._backlog.mutex:
            return [group[0].prompt_uid for group in self._backlog.queue if group]

    def close(self) -> None:
        while self._thread.is_alive() and self._failure is None and not self._handed_over(None):
            pass
        self._thread.join()

    def _handed_over(self, item: list[Trajectory] | None) -> bool:
        """Whether `item` went into the backlog within a short wait (none once the thread failed)."""
        if self._failure is not None:
            return False
        try:
            self._backlog.put(item, timeout=HAND_OVER_WAIT_S)
            return True
        except queue.Full:
            return False

    def _run(self, sender: TrajectorySender) -> None:
        try:
            while (group := self._backlog.get()) is not None:
                if sender.endpoints != (endpoints := self._endpoints()):
                    sender.retarget(endpoints)
                sender.send_group(group)
        except BaseException as err:  # the caller's next send_group or raise_if_failed raises it
            logger.warning("trajectory sender thread failed: {!r}", err)
            self._failure = err
        finally:
            sender.close()
