"""Local TCP ports: one home for picking a free loopback port and for checking an address before serving."""

from __future__ import annotations

import errno
import socket


class AddressInUse(OSError):
    """The address cannot be bound; the message names it."""


def free_port(host: str = "127.0.0.1") -> int:
    """A port the OS says is free on ``host`` now (another process may still take it before it is used)."""
    with socket.socket(_family(host), socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


def check_address_free(host: str, port: int) -> None:
    """Raise AddressInUse with one line when ``host:port`` cannot be listened on."""
    with socket.socket(_family(host), socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host, port))
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                raise AddressInUse(f"port {port} on {host} is already in use") from None
            raise AddressInUse(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from None


def _family(host: str) -> socket.AddressFamily:
    return socket.AF_INET6 if ":" in host else socket.AF_INET
