"""The workers of one ``socksflow run --workers N`` asking each other questions.

An operator sees the server as a whole — one metrics scrape, one admin view — though N
processes serve it.  Each worker answers named questions (``"metrics"``…) on a private
socket in Linux's abstract namespace (no file to clean up, reachable only from this machine
and, being named after the supervisor's group, only by its workers); the worker that an
operator reached asks the others and merges the answers.

One exchange per connection: the asker sends the topic and a newline, the answerer sends
the answer and closes.  A worker that does not answer in time (it is restarting) is left
out and logged, never waited for.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import logging
import socket
from collections.abc import Awaitable, Callable

log = logging.getLogger("socksflow.peers")

MAX_TOPIC = 64
Answer = Callable[[], bytes | Awaitable[bytes]]


class Peers:
    """This worker's side: answering the others, and asking them."""

    def __init__(self, group: str, worker: int, workers: int) -> None:
        self.group = group
        self.worker = worker
        self.workers = workers
        self._answers: dict[str, Answer] = {}
        self._listener: asyncio.Server | None = None

    def _address(self, worker: int) -> str:
        return f"\0socksflow-{self.group}-{worker}"

    def answer(self, topic: str, callback: Answer) -> None:
        """Answer ``topic`` with what ``callback`` returns (bytes, or an awaitable of bytes)."""
        self._answers[topic] = callback

    def forget(self, topic: str) -> None:
        self._answers.pop(topic, None)

    async def start(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.bind(self._address(self.worker))
        except OSError:
            sock.close()
            raise
        self._listener = await asyncio.start_unix_server(self._serve, sock=sock)

    async def close(self) -> None:
        if self._listener is not None:
            self._listener.close()
            self._listener = None

    async def ask(self, topic: str, timeout: float) -> list[bytes]:
        """The answers of every other worker to ``topic`` (those that answered in time)."""
        others = [n for n in range(self.workers) if n != self.worker]
        results = await asyncio.gather(*(self._ask_one(n, topic, timeout) for n in others))
        return [result for result in results if result is not None]

    async def _ask_one(self, worker: int, topic: str, timeout: float) -> bytes | None:
        writer = None
        try:
            async with asyncio.timeout(timeout):
                # uvloop's open_unix_connection refuses abstract names (EINVAL); sock_connect takes them.
                sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                sock.setblocking(False)
                try:
                    await asyncio.get_running_loop().sock_connect(sock, self._address(worker))
                except BaseException:
                    sock.close()
                    raise
                reader, writer = await asyncio.open_unix_connection(sock=sock)
                writer.write(topic.encode() + b"\n")
                return await reader.read()
        except (OSError, TimeoutError) as exc:
            log.warning(
                "worker %d did not answer %r: %s",
                worker,
                topic,
                exc.strerror if isinstance(exc, OSError) else "timed out",
            )
            return None
        finally:
            if writer is not None:
                writer.close()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            line = await asyncio.wait_for(reader.readline(), 5.0)
            callback = self._answers.get(line[:MAX_TOPIC].strip().decode("ascii", "replace"))
            if callback is not None:
                answer = callback()
                writer.write(await answer if inspect.isawaitable(answer) else answer)
                await writer.drain()
        except (OSError, TimeoutError, UnicodeError):
            pass
        except Exception:  # a plugin's answer failed: the asker gets nothing, this worker goes on
            log.exception("answering a peer failed")
        finally:
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()
