"""The asyncio client: one pipelined Unix-socket connection per event loop
and process.

Every coroutine that records an event writes its request on the shared
connection and waits on a future; a reader task resolves the futures by the
answers' ``id``, in whatever order the agent answers (an async event's answer
does not wait behind a sync one's). ``drain()`` after each write is the
agent's backpressure reaching the caller: when the agent stops reading, the
writes stop completing. A connection opened before ``fork()`` is never used
by the child: the pid is checked on every call and the child connects anew.
"""

import asyncio
import os
from typing import Any, Dict, Mapping, Optional

from . import _protocol as p


class _Link:
    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter):
        self.reader = reader
        self.writer = writer
        self.loop = asyncio.get_running_loop()
        self.pid = os.getpid()
        self.pending: Dict[int, "asyncio.Future[Dict[str, Any]]"] = {}
        self.next_id = 1
        self.failure: Optional[p.AuditError] = None
        self.drain_lock = asyncio.Lock()
        self.task = self.loop.create_task(self._read_answers())

    async def _read_answers(self) -> None:
        error: p.AuditError
        try:
            while True:
                line = await self.reader.readline()
                if not line.endswith(b"\n"):
                    error = p.AuditOutcomeUnknown("the agent closed the connection", "connection")
                    break
                answer = p.decode_answer(line)
                rid = answer.get("id")
                if rid is None:
                    error = (
                        p.error_from_answer(answer)
                        if answer.get("kind") == "forbidden"
                        else p.AuditOutcomeUnknown(
                            "the agent could not read a request: %s" % answer.get("error"), "connection"
                        )
                    )
                    break
                fut = self.pending.pop(rid, None)
                if fut is not None and not fut.done():
                    fut.set_result(answer)
        except p.AuditError as e:
            error = e
        except (OSError, ConnectionError) as e:
            error = p.AuditOutcomeUnknown("the connection to the agent failed: %s" % e, "connection")
        self.fail(error)

    def fail(self, error: p.AuditError) -> None:
        self.failure = error
        pending, self.pending = self.pending, {}
        for fut in pending.values():
            if not fut.done():
                fut.set_exception(error)
        self.writer.close()

    def usable(self) -> bool:
        return self.failure is None and self.pid == os.getpid() and self.loop is asyncio.get_running_loop()


class AsyncAgentClient:
    """The asyncio twin of :class:`auditwal_client.AgentClient`: ``await
    record(event, mode)`` returns the receipt once the mode's promise holds.
    Many coroutines may record at once; their requests are pipelined."""

    def __init__(self, socket_path: str, timeout: Optional[float] = 30.0):
        self.socket_path = socket_path
        self.timeout = timeout
        self._link: Optional[_Link] = None

    async def _get_link(self) -> _Link:
        link = self._link
        if link is not None and link.usable():
            return link
        if link is not None and link.pid == os.getpid() and link.loop is asyncio.get_running_loop():
            link.writer.close()
        self._link = None
        try:
            reader, writer = await asyncio.open_unix_connection(self.socket_path, limit=1 << 20)
        except OSError as e:
            raise p.connect_error(self.socket_path, e) from e
        # Another coroutine may have connected meanwhile: keep one link.
        if self._link is not None and self._link.usable():
            writer.close()
            return self._link
        self._link = _Link(reader, writer)
        return self._link

    async def record(
        self,
        event: Mapping[str, Any],
        mode: Optional[str] = None,
        sample_rate: Optional[float] = None,
    ) -> p.Receipt:
        link = await self._get_link()
        rid = link.next_id
        link.next_id += 1
        line = p.encode_request(rid, mode, event, sample_rate)
        fut: "asyncio.Future[Dict[str, Any]]" = link.loop.create_future()
        link.pending[rid] = fut
        try:
            link.writer.write(line)
            async with link.drain_lock:
                await link.writer.drain()
            answer = await asyncio.wait_for(fut, self.timeout)
        except asyncio.TimeoutError as e:
            link.pending.pop(rid, None)
            raise p.AuditOutcomeUnknown("no answer from the agent within %ss" % self.timeout, "timeout") from e
        except (OSError, ConnectionError) as e:
            link.pending.pop(rid, None)
            error = p.AuditOutcomeUnknown("the connection to the agent failed: %s" % e, "connection")
            link.fail(error)
            raise error from e
        return p.outcome(answer)

    async def close(self) -> None:
        link, self._link = self._link, None
        if link is not None and link.pid == os.getpid():
            link.task.cancel()
            link.writer.close()
            try:
                await link.writer.wait_closed()
            except (OSError, ConnectionError):
                pass
