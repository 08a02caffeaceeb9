"""``AuditService``: what a service calls, configured like the audit service
auditwal started from.

Settings, read from the environment unless given:

- ``AUDIT_MODE``: ``sync`` (committed in PostgreSQL, returns the row id),
  ``durable`` (fsynced to the agent's WAL), ``async`` (in the agent's WAL
  file: survives a crash of the service and of the agent), ``sampled`` (the
  agent keeps a fraction, at its own ``AUDIT_SAMPLE_RATE``), or ``off``
  (nothing is sent). Default ``async``.
- ``AUDIT_SAMPLE_RATE``: the rate sampled mode is expected to keep, in
  [0, 1]. The agent does the sampling (so every worker keeps the same
  requests); this value is sent with sampled events and the agent refuses
  them (:class:`AuditRejected`, field ``sample_rate``) when its own rate
  differs, so a mismatch is seen at once rather than in the statistics.
- ``AUDITWAL_SOCKET``: the agent's socket; default ``agent.sock`` in
  ``AUDITWAL_WAL_DIR`` when that is set, else ``/run/auditwal/agent.sock``.

A sync caller refuses the action when ``log_event`` raises; an async caller
catches :class:`AuditError`, logs it and goes on (the Spring account's split).
"""

import os
from typing import Any, Mapping, Optional, Tuple, Union

from . import _protocol as p
from .aio import AsyncAgentClient
from .client import AgentClient

DEFAULT_SOCKET = "/run/auditwal/agent.sock"

EventArg = Union[str, Mapping[str, Any], None]


def _socket_from_env() -> str:
    path = os.environ.get("AUDITWAL_SOCKET")
    if path:
        return path
    wal_dir = os.environ.get("AUDITWAL_WAL_DIR")
    if wal_dir:
        return os.path.join(wal_dir, "agent.sock")
    return DEFAULT_SOCKET


def _rate_from_env() -> Optional[float]:
    text = os.environ.get("AUDIT_SAMPLE_RATE")
    if text is None or text.strip() == "":
        return None
    try:
        return float(text)
    except ValueError:
        raise ValueError("AUDIT_SAMPLE_RATE=%r is not a number in [0, 1]" % text) from None


class _Settings:
    def __init__(self, mode: Optional[str], sample_rate: Optional[float], socket_path: Optional[str]):
        self.mode = p.check_mode(mode if mode is not None else os.environ.get("AUDIT_MODE", "async"))
        self.sample_rate = sample_rate if sample_rate is not None else _rate_from_env()
        if self.sample_rate is not None and not 0.0 <= self.sample_rate <= 1.0:
            raise ValueError("audit sample rate %r is not in [0, 1]" % self.sample_rate)
        self.socket_path = socket_path or _socket_from_env()

    def event(self, event: EventArg, fields: Mapping[str, Any]) -> Mapping[str, Any]:
        if isinstance(event, str):
            return p.build_event(None, dict(fields, action=event))
        return p.build_event(event, fields)

    def mode_for(self, mode: Optional[str]) -> str:
        if mode is None:
            return self.mode
        try:
            return p.check_mode(mode)
        except ValueError as e:
            # A bad setting fails at start (ValueError); a bad call is a bad event.
            raise p.AuditRejected(str(e), "invalid_request", "mode") from None


class _Service:
    """What the blocking and the asyncio service share: the settings, and a
    client (of ``_client_class``) to the agent they name."""

    _client_class: Any

    def __init__(
        self,
        mode: Optional[str] = None,
        sample_rate: Optional[float] = None,
        socket_path: Optional[str] = None,
        timeout: Optional[float] = 30.0,
    ):
        self.settings = _Settings(mode, sample_rate, socket_path)
        self.client = self._client_class(self.settings.socket_path, timeout)

    @property
    def mode(self) -> str:
        return self.settings.mode

    def _request(
        self, event: EventArg, mode: Optional[str], fields: Mapping[str, Any]
    ) -> Optional[Tuple[Mapping[str, Any], str]]:
        """The event to send and its mode, or None when the mode is ``off``
        (a bad mode or event raises either way)."""
        m = self.settings.mode_for(mode)
        body = self.settings.event(event, fields)
        if m == "off":
            return None
        return body, m


class AuditService(_Service):
    """Blocking ``log_event``; thread-safe and fork-safe.

    ``log_event("admin.user.disabled", actor_id="7", target_type="user",
    target_id="42", mode="sync")`` returns a :class:`Receipt` (``row_id`` in
    sync mode), or None when the mode is ``off``. The first argument is the
    action, or a mapping of schema fields (the seed's ``AuditEvent``); keyword
    arguments are schema fields too.
    """

    _client_class = AgentClient

    def log_event(self, event: EventArg = None, *, mode: Optional[str] = None, **fields: Any) -> Optional[p.Receipt]:
        request = self._request(event, mode, fields)
        if request is None:
            return None
        return self.client.record(*request, self.settings.sample_rate)

    def close(self) -> None:
        self.client.close()


class AsyncAuditService(_Service):
    """``await log_event(...)``, for asyncio services (FastAPI); the same
    arguments, receipts and errors as :class:`AuditService`."""

    _client_class = AsyncAgentClient

    async def log_event(
        self, event: EventArg = None, *, mode: Optional[str] = None, **fields: Any
    ) -> Optional[p.Receipt]:
        request = self._request(event, mode, fields)
        if request is None:
            return None
        return await self.client.record(*request, self.settings.sample_rate)

    async def close(self) -> None:
        await self.client.close()
