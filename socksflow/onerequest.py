"""What the front doors with one request and one reply (SOCKS4, HTTP) share: buffer and phases.

Phases follow :class:`~socksflow.protocol.Phase`: REQUEST, then REPLY once the request is
taken, then DONE after a granted reply (the stream belongs to the relay) or CLOSED.
"""

from __future__ import annotations

from typing import Any

from socksflow.protocol import NEED_DATA, BufferedInput, Phase, ProtocolError, ServerConnection


class OneRequestConnection(BufferedInput):
    """Bytes in, one request event out; subclasses parse (:meth:`_parse`) and reply."""

    __slots__ = ("phase",)

    def __init__(self) -> None:
        super().__init__()
        self.phase = Phase.REQUEST

    def next_event(self) -> Any:
        """The request, or NEED_DATA.  Raises a ProtocolError (phase becomes CLOSED)."""
        if self.phase is not Phase.REQUEST:
            return NEED_DATA
        try:
            parsed = self._parse(self._buffer)
        except ProtocolError:
            self.phase = Phase.CLOSED
            raise
        if parsed is None:
            return NEED_DATA
        event, consumed = parsed
        del self._buffer[:consumed]
        self.phase = Phase.REPLY
        return event

    def _parse(self, data: bytearray) -> tuple[Any, int] | None:
        raise NotImplementedError

    # The same buffer and phase as SOCKS5's connection: the same hand-over to the relay.
    trailing_data = ServerConnection.trailing_data
    _expect = ServerConnection._expect
