"""A free TCP port on localhost for a torchrun rendezvous: tests may run in parallel (``pytest -n``), so a port
derived from the process id could be taken by another worker's torchrun."""

import socket


def free_port() -> int:
    """A port the OS reports free right now (bound to port 0 and released)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
