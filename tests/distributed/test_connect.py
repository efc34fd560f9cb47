"""``distributed/connect.py``: an address nothing answers at is a quick, clear error."""

from __future__ import annotations

import pytest

from sylva_ray.base.config import ConfigError
from sylva_ray.distributed.connect import probe_address
from sylva_ray.engine.resolve import load_config


def test_unreachable_address_is_a_quick_clear_error():
    import socket

    with socket.socket() as sock:  # a loopback port nobody listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    with pytest.raises(ConnectionError, match="nothing answers"):
        probe_address(f"127.0.0.1:{port}")
    with pytest.raises(ConfigError, match="runtime.address"):
        load_config("smoke", overrides=["runtime.address=127.0.0.1"])
