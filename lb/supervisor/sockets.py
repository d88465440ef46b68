"""The listening sockets the supervisor owns and hands to its children."""

from __future__ import annotations

import socket

from lb.core import config as cfgmod


class ListenError(Exception):
    """A listener cannot be had (address in use, no permission...)."""


def listen_socket(address: str, backlog: int) -> socket.socket:
    host, port = cfgmod.parse_address(address, allow_hostname=False)
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind((host, port))
        sock.listen(backlog)
    except OSError as exc:
        sock.close()
        raise ListenError(f"cannot listen on {address}: {exc.strerror}") from None
    sock.setblocking(False)
    return sock


def admin_socket(address: str) -> socket.socket:
    """The admin listener: one socket, kept by the supervisor, inherited by each
    admin process it starts (so restarting the admin process loses no port)."""
    host, port = cfgmod.parse_address(address, allow_hostname=False)
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
        sock.listen(128)
    except OSError as exc:
        sock.close()
        raise ListenError(f"cannot listen on {address} (admin): {exc.strerror}") from None
    return sock


def ensure_free(address: str) -> None:
    """Fail if anything listens on `address` already.

    SO_REUSEPORT would otherwise let a second lb (same user) bind the same port
    and take half of the first one's connections.  A socket without
    SO_REUSEPORT cannot bind where a listener exists, which makes the check.
    """
    host, port = cfgmod.parse_address(address, allow_hostname=False)
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host, port))
        except OSError as exc:
            raise ListenError(f"cannot listen on {address}: {exc.strerror}") from None
