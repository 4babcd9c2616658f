"""Optional CurveZMQ between the scheduler and workers on other hosts: encryption, and with
a client key authentication. Keys are Z85 (`python -m conveyor keys` makes a set): the
scheduler holds the server secret key, and with the client public key admits only workers
holding that pair; workers hold the server public key and the client key pair.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import zmq

if TYPE_CHECKING:
    from zmq.auth.thread import ThreadAuthenticator


def make_keys() -> dict[str, str]:
    server_public, server_secret = zmq.curve_keypair()
    client_public, client_secret = zmq.curve_keypair()
    return {
        "CONVEYOR_ZMQ_SERVER_SECRET_KEY": server_secret.decode(),  # scheduler
        "CONVEYOR_ZMQ_CLIENT_PUBLIC_KEY": client_public.decode(),  # scheduler: who may connect
        "CONVEYOR_ZMQ_SERVER_PUBLIC_KEY": server_public.decode(),  # workers
        "CONVEYOR_ZMQ_CLIENT_SECRET_KEY": client_secret.decode(),  # workers
    }


def secure_server(
    sock: zmq.Socket[bytes], server_secret: str, client_public: str | None
) -> ThreadAuthenticator | None:
    """Make `sock` (before bind) a CURVE server. Returns the authenticator thread to stop
    at exit, or None when any client that knows the server's public key may connect."""
    sock.curve_secretkey = server_secret.encode()
    sock.curve_publickey = zmq.curve_public(server_secret.encode())
    sock.curve_server = True
    if client_public is None:
        return None
    from zmq.auth.thread import ThreadAuthenticator

    auth = ThreadAuthenticator(zmq.Context.instance())
    auth.start()
    auth.configure_curve_callback(domain="*", credentials_provider=_AllowOnly(client_public.encode()))
    return auth


def secure_client(sock: zmq.Socket[bytes], server_public: str, client_secret: str) -> None:
    """Make `sock` (before connect) a CURVE client of the scheduler."""
    sock.curve_serverkey = server_public.encode()
    sock.curve_secretkey = client_secret.encode()
    sock.curve_publickey = zmq.curve_public(client_secret.encode())


class _AllowOnly:
    """The authenticator's credentials provider: one allowed client public key."""

    def __init__(self, public_key: bytes):
        self.allowed = public_key  # Z85, as pyzmq hands the client's key to the callback

    def callback(self, domain: str, key: bytes) -> bool:
        return key == self.allowed
