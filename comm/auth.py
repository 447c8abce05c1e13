"""ZeroMQ CURVE keys and client authentication for the trajectory channel.

Loopback endpoints speak plain TCP. Any other interface needs CURVE: the driver calls
`run_keys` once per run with every address an endpoint may bind and hands the resulting `ChannelKeys` (or None) to every
actor as an argument, so the keys live only in memory and travel through Ray.

One `ChannelKeys` serves the whole run: a server key pair shared by every receiver and a
client key pair shared by every sender. Judges both receive and send, and all actors of a run
are one trust domain, so one object for everyone is simpler than per-role halves and exposes
no secret that a Ray worker could not already read. What CURVE gives: only a peer holding the
server secret can act as a receiver (senders pin its public key), everything is encrypted, and
a receiver's ZAP handler accepts only the run's client public key, so a client with another
key pair, or without CURVE, never delivers a message.
"""
import hmac
import ipaddress
import threading
from dataclasses import dataclass, field

import zmq
from loguru import logger
from zmq.auth.thread import ThreadAuthenticator


@dataclass(frozen=True)
class ChannelKeys:
    """The run's CURVE key pairs, Z85-encoded (40 bytes each). Picklable; secrets stay out of repr."""

    server_public: bytes
    server_secret: bytes = field(repr=False)
    client_public: bytes
    client_secret: bytes = field(repr=False)

    @classmethod
    def generate(cls) -> "ChannelKeys":
        if not zmq.has("curve"):
            raise RuntimeError("this libzmq was built without CURVE; cannot bind off loopback")
        server_public, server_secret = zmq.curve_keypair()
        client_public, client_secret = zmq.curve_keypair()
        return cls(server_public, server_secret, client_public, client_secret)


def is_loopback(host: str) -> bool:
    """True for "localhost", 127.0.0.0/8 and ::1; any other name or address is not loopback."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def endpoint_host(endpoint: str) -> str:
    """The host part of "tcp://host:port"."""
    return endpoint.split("://", 1)[-1].rsplit(":", 1)[0].strip("[]")


def run_keys(*hosts: str) -> ChannelKeys | None:
    """Fresh keys for a run whose endpoints bind to `hosts`; None when all are loopback (plain TCP)."""
    return None if all(is_loopback(host) for host in hosts) else ChannelKeys.generate()


def require_keys(host: str, keys: ChannelKeys | None, what: str) -> None:
    if keys is None and not is_loopback(host):
        raise ValueError(f"{what} on {host!r} is off loopback and needs ChannelKeys (CURVE); "
                         "make them with comm.auth.run_keys in the driver")


def secure_server(socket: zmq.Socket, keys: ChannelKeys) -> None:
    """Make `socket` a CURVE server with the run's server key pair; call before bind."""
    socket.curve_server = True
    socket.curve_publickey = keys.server_public
    socket.curve_secretkey = keys.server_secret


def secure_client(socket: zmq.Socket, keys: ChannelKeys) -> None:
    """Make `socket` a CURVE client with the run's client key pair; call before connect."""
    socket.curve_publickey = keys.client_public
    socket.curve_secretkey = keys.client_secret
    socket.curve_serverkey = keys.server_public


class ClientGate:
    """ZAP handler for one zmq.Context: accepts CURVE clients presenting the run's client key.

    ZAP is per context (one handler on inproc://zeromq.zap.01), so a CURVE receiver owns a private
    context with its gate and stops both when it closes; the gate's thread ends with `stop`.
    `refused` counts CURVE handshakes that presented another client key (the server key right).
    Clients without CURVE, or holding another server key, fail the handshake inside libzmq before
    ZAP and are not counted. The count is written by the gate's thread; read it, never write it.
    `name` (the receiver's endpoint once bound) labels the warning logged on the first refusal.
    """

    def __init__(self, context: zmq.Context, keys: ChannelKeys):
        self._client_public = keys.client_public.decode("ascii")
        self.name = "a receiver"
        self._lock = threading.Lock()
        self.refused = 0
        self._authenticator = ThreadAuthenticator(context)
        self._authenticator.configure_curve_callback("*", credentials_provider=self)
        self._authenticator.start()

    def callback(self, domain: str, client_public: bytes | str) -> bool:
        """ThreadAuthenticator's hook, on its thread; `client_public` is Z85."""
        key = client_public.decode("ascii") if isinstance(client_public, bytes) else client_public
        if hmac.compare_digest(key, self._client_public):
            return True
        with self._lock:
            self.refused += 1
            first = self.refused == 1
        if first:
            logger.warning("{} refused a CURVE client with an unknown key; further refusals are only counted",
                           self.name)
        return False

    def stop(self) -> None:
        self._authenticator.stop()
