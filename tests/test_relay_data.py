"""``socksflow_relay_data`` chains: each plugin gets the chunk as the previous one left it."""

from __future__ import annotations

import os

import socksflow
from socksflow import Direction
from socksflow.testing import Socks5Client


class Xor:
    """Flips bits of every byte, one mask per direction: masks compose only if the hooks chain."""

    def __init__(self, up: int, down: int) -> None:
        self.masks = {
            Direction.UP: bytes(b ^ up for b in range(256)),
            Direction.DOWN: bytes(b ^ down for b in range(256)),
        }

    @socksflow.hookimpl
    def socksflow_relay_data(self, direction: Direction, data: bytes) -> bytes:
        return data.translate(self.masks[direction])


def test_two_transforming_plugins_chain_in_both_directions(socksflow_server, echo):
    # Through the echo target: up, the target gets payload ^ 0x01 ^ 0x02; down, the client
    # gets that ^ 0x04 ^ 0x08.  Keeping only one plugin's answer leaves another mask.
    server = socksflow_server(plugins=[Xor(0x01, 0x04), Xor(0x02, 0x08)])
    payload = os.urandom(1024 * 1024)  # many chunks each way
    with Socks5Client(server.address) as client:
        client.greet()
        code, _ = client.connect(echo)
        assert code == 0
        client.sock.sendall(payload)
        echoed = client.recv_exactly(len(payload))
    assert echoed == bytes(b ^ 0x0F for b in payload)
