"""The blocking client: one Unix-socket connection per thread and process.

Each thread gets its own connection (so threads never wait on each other's
answers), opened on first use. A connection belongs to the process that
opened it: after ``fork()`` the child sees a different pid and opens its own,
never writing to or reading from the parent's (whose answers it would steal,
and whose identity the agent would stamp on its events). ``record_many``
pipelines a batch on one connection; ``record`` sends one request and waits
for its answer.
"""

import os
import socket
import threading
import weakref
from typing import Any, Iterable, List, Mapping, NoReturn, Optional, Union

from . import _protocol as p

_clients: "weakref.WeakSet[AgentClient]" = weakref.WeakSet()


def _after_fork_in_child() -> None:
    for client in list(_clients):
        client._forget_connections()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)


class _Connection:
    __slots__ = ("sock", "buf", "next_id", "pid")

    def __init__(self, path: str, timeout: Optional[float]):
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            self.sock.settimeout(timeout)
            self.sock.connect(path)
        except BaseException:
            self.sock.close()
            raise
        self.buf = b""
        self.next_id = 1
        self.pid = os.getpid()

    def readline(self) -> bytes:
        while True:
            i = self.buf.find(b"\n")
            if i >= 0:
                line, self.buf = self.buf[:i], self.buf[i + 1 :]
                return line
            chunk = self.sock.recv(65536)
            if not chunk:
                raise ConnectionError("the agent closed the connection")
            self.buf += chunk

    def close(self) -> None:
        try:
            self.sock.close()
        except OSError:
            pass


class AgentClient:
    """Sends events to the agent at ``socket_path`` and returns its receipts.

    ``timeout`` (seconds) bounds each wait for the agent; it should exceed the
    agent's ``AUDITWAL_SYNC_TIMEOUT_MS`` for sync calls. Thread-safe and
    fork-safe. Raises :class:`AuditRejected`, :class:`AuditUnavailable` or
    :class:`AuditOutcomeUnknown`; never returns without the agent's answer.
    """

    def __init__(self, socket_path: str, timeout: Optional[float] = 30.0):
        self.socket_path = socket_path
        self.timeout = timeout
        self._local = threading.local()
        _clients.add(self)

    def _forget_connections(self) -> None:
        # In a forked child: the parent's sockets are not ours to use (or to
        # shut down); fresh thread state makes every thread open its own.
        self._local = threading.local()

    def _connection(self) -> _Connection:
        conn = getattr(self._local, "conn", None)
        if conn is not None and conn.pid == os.getpid():
            return conn
        try:
            conn = _Connection(self.socket_path, self.timeout)
        except OSError as e:
            raise p.connect_error(self.socket_path, e) from e
        self._local.conn = conn
        return conn

    def _drop(self, conn: _Connection) -> None:
        conn.close()
        if getattr(self._local, "conn", None) is conn:
            self._local.conn = None

    def _broken(self, conn: _Connection, error: Exception) -> NoReturn:
        """Drops ``conn``, on which ``error`` cut an exchange short (the
        answers still due on it would be lost), and raises what the caller
        sees: an AuditError as it is, a timeout or a socket failure as
        :class:`AuditOutcomeUnknown`."""
        self._drop(conn)
        if isinstance(error, p.AuditError):
            raise error
        if isinstance(error, socket.timeout):
            raise p.AuditOutcomeUnknown("no answer from the agent within %ss" % self.timeout, "timeout") from error
        raise p.AuditOutcomeUnknown("the connection to the agent failed: %s" % error, "connection") from error

    def record(
        self,
        event: Mapping[str, Any],
        mode: Optional[str] = None,
        sample_rate: Optional[float] = None,
    ) -> p.Receipt:
        """Records one event (a mapping of schema fields) in ``mode`` (None:
        the agent's default) and returns the receipt once the mode's promise
        holds."""
        conn = self._connection()
        rid = conn.next_id
        conn.next_id += 1
        line = p.encode_request(rid, mode, event, sample_rate)
        try:
            conn.sock.sendall(line)
            answer = p.decode_answer(conn.readline())
        except (OSError, p.AuditError) as e:
            self._broken(conn, e)
        if answer.get("id") != rid:
            self._drop(conn)
            if answer.get("id") is None and "error" in answer:
                raise p.error_from_answer(answer)
            raise p.AuditOutcomeUnknown("the agent answered request %r, not %r" % (answer.get("id"), rid), "connection")
        return p.outcome(answer)

    def record_many(
        self,
        events: Iterable[Mapping[str, Any]],
        mode: Optional[str] = None,
        sample_rate: Optional[float] = None,
    ) -> List[Union[p.Receipt, p.AuditError]]:
        """Pipelines ``events`` on this thread's connection: all are sent, then
        the answers read. Returns, in order, a receipt or the error of each.
        A failure of the connection itself raises (the events after the
        last answer have an unknown outcome)."""
        conn = self._connection()
        ids: List[int] = []
        lines = []
        for event in events:
            rid = conn.next_id
            conn.next_id += 1
            ids.append(rid)
            lines.append(p.encode_request(rid, mode, event, sample_rate))
        results = {}
        try:
            # Sending and reading overlap for big batches: the agent stops
            # reading when this connection has many requests unanswered.
            sender = None
            payload = b"".join(lines)
            if len(payload) > 256 * 1024:
                sender = threading.Thread(target=conn.sock.sendall, args=(payload,), daemon=True)
                sender.start()
            else:
                conn.sock.sendall(payload)
            while len(results) < len(ids):
                answer = p.decode_answer(conn.readline())
                rid = answer.get("id")
                if rid is None:
                    raise p.AuditOutcomeUnknown(
                        "the agent could not read a request: %s" % answer.get("error"), "connection"
                    )
                try:
                    results[rid] = p.outcome(answer)
                except p.AuditError as e:
                    results[rid] = e
            if sender is not None:
                sender.join()
        except (OSError, p.AuditError) as e:
            self._broken(conn, e)
        return [results[i] for i in ids]

    def close(self) -> None:
        """Closes this thread's connection (others close when their thread's
        state is collected)."""
        conn = getattr(self._local, "conn", None)
        if conn is not None and conn.pid == os.getpid():
            conn.close()
        self._local.conn = None
