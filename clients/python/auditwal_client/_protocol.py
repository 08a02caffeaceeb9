"""The agent's wire format (docs/agent.md), shared by the blocking and the
asyncio client: one JSON object a line each way, matched by ``id``.

This module owns the request encoding, the answer decoding, the receipt and
the exceptions. It does no I/O.
"""

import json
from typing import Any, Dict, Mapping, NamedTuple, Optional

#: Modes the agent knows. ``off`` is the client's own: nothing is sent.
AGENT_MODES = ("sync", "durable", "async", "sampled")
MODES = AGENT_MODES + ("off",)

#: The event's fields, by their schema names (the names ``auditwal emit`` reads).
EVENT_FIELDS = (
    "event_id",
    "occurred_at",
    "action",
    "actor_id",
    "actor_type",
    "target_type",
    "target_id",
    "target_name",
    "tenant_id",
    "outcome",
    "reason",
    "ip",
    "user_agent",
    "request_id",
    "before",
    "after",
    "metadata",
)

_EVENT_FIELD_SET = frozenset(EVENT_FIELDS)

#: The ``metadata`` key under which the agent records the sender's uid and pid.
PEER_KEY = "_auditwal_peer"

_ENCODE = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False, default=str)


class AuditError(Exception):
    """An event got no receipt. ``kind`` is the agent's error kind (or
    ``connection`` / ``timeout`` for a failure of the link to it), ``field``
    the event field at fault when one is."""

    def __init__(self, message: str, kind: str, field: Optional[str] = None):
        super().__init__(message)
        self.message = message
        self.kind = kind
        self.field = field


class AuditRejected(AuditError):
    """The event is refused as it is (a missing ``action``, a field of the
    wrong type, over the size limit, an unknown mode, a uid not allowed).
    Nothing was stored; sending it again unchanged fails again."""


class AuditDuplicate(AuditRejected):
    """Sync: a row with this ``event_id`` and ``occurred_at`` is already
    stored (an earlier attempt whose outcome was unknown did commit)."""


class AuditUnavailable(AuditError):
    """The agent, its WAL or the database cannot take the event now (agent not
    running, disk budget full, database unreachable, agent shutting down).
    The event was not stored; it may be sent again later."""


class AuditOutcomeUnknown(AuditUnavailable):
    """The request was sent and no answer came (the agent died, the link
    broke, the timeout passed, or a sync INSERT got no answer from the
    database): the event may be stored. Sending the same event again (same
    ``event_id`` and ``occurred_at``) is safe: in sync mode a stored one is
    reported as :class:`AuditDuplicate`."""


_REJECTED = {"invalid_event", "invalid_request", "too_large", "forbidden"}


def connect_error(socket_path: str, error: OSError) -> AuditUnavailable:
    """The error of a failed attempt to connect to the agent at ``socket_path``."""
    if isinstance(error, FileNotFoundError):
        return AuditUnavailable(
            "no agent socket at %s (is `auditwal agent` running? AUDITWAL_SOCKET)" % socket_path, "connection"
        )
    return AuditUnavailable("cannot connect to the agent at %s: %s" % (socket_path, error), "connection")


def error_from_answer(answer: Mapping[str, Any]) -> AuditError:
    kind = str(answer.get("kind", "unavailable"))
    message = str(answer.get("error", "the agent refused the event"))
    field = answer.get("field")
    if kind == "duplicate":
        return AuditDuplicate(message, kind, field)
    if kind == "outcome_unknown":
        return AuditOutcomeUnknown(message, kind, field)
    if kind in _REJECTED:
        return AuditRejected(message, kind, field)
    return AuditUnavailable(message, kind, field)


class Receipt(NamedTuple):
    """What the agent answered: the event's id and where it now is.

    ``row_id`` (sync): the committed row's ``audit_events.id``, the audit id a
    response can carry. ``lsn`` (durable, async, kept sampled): the WAL
    record's position in the agent's stream. ``sampled_out``: sampled mode
    did not keep it; nothing was stored. (A named tuple: cheap to build on
    the hot path.)
    """

    event_id: str
    mode: str
    lsn: Optional[int] = None
    row_id: Optional[int] = None
    sample_rate: Optional[float] = None
    sampled_out: bool = False

    @property
    def kept(self) -> bool:
        return not self.sampled_out


def receipt_from_answer(answer: Mapping[str, Any]) -> Receipt:
    return Receipt(
        event_id=str(answer["event_id"]),
        mode=str(answer.get("mode", "")),
        lsn=answer.get("lsn"),
        row_id=answer.get("row_id"),
        sample_rate=answer.get("sample_rate"),
        sampled_out=bool(answer.get("sampled_out", False)),
    )


def build_event(event: Optional[Mapping[str, Any]], fields: Mapping[str, Any]) -> Dict[str, Any]:
    """The event as the agent reads it: ``event`` (a mapping of schema
    fields) updated with ``fields``, without the fields that are None.
    Unknown names are refused here, before anything is sent."""
    if event is None:
        merged = fields
    else:
        merged = dict(event)
        merged.update(fields)
    if not _EVENT_FIELD_SET.issuperset(merged):
        unknown = [k for k in merged if k not in _EVENT_FIELD_SET]
        raise AuditRejected(
            "unknown event field(s) %s; the fields are %s" % (", ".join(sorted(unknown)), ", ".join(EVENT_FIELDS)),
            "invalid_event",
            sorted(unknown)[0],
        )
    return {k: v for k, v in merged.items() if v is not None}


def check_mode(mode: str) -> str:
    m = mode.strip().lower()
    if m not in MODES:
        raise ValueError("unknown audit mode %r: use one of %s" % (mode, ", ".join(MODES)))
    return m


def encode_request(request_id: int, mode: Optional[str], event: Mapping[str, Any], sample_rate: Optional[float]) -> bytes:
    """One request line. ``id`` comes first: the agent finds it in the first
    bytes of a line too long to parse, so even that refusal can be matched."""
    if mode is not None and mode not in AGENT_MODES:
        raise AuditRejected(
            "unknown mode %r: use one of %s" % (mode, ", ".join(AGENT_MODES)), "invalid_request", "mode"
        )
    if sample_rate is not None and not 0.0 <= sample_rate <= 1.0:
        raise AuditRejected("sample_rate %r is not in [0, 1]" % (sample_rate,), "invalid_request", "sample_rate")
    try:
        body = _ENCODE.encode(event)
    except (TypeError, ValueError) as e:
        raise AuditRejected("the event cannot be encoded as JSON: %s" % e, "invalid_event") from e
    # The envelope by hand: its values are an int, a mode from MODES and a
    # float, none of which needs escaping, and this is the hot path.
    if mode is None:
        head = '{"id":%d,' % request_id
    elif sample_rate is not None and mode == "sampled":
        head = '{"id":%d,"mode":"%s","sample_rate":%r,' % (request_id, mode, float(sample_rate))
    else:
        head = '{"id":%d,"mode":"%s",' % (request_id, mode)
    return (head + '"event":' + body + "}\n").encode("utf-8")


def decode_answer(line: bytes) -> Dict[str, Any]:
    try:
        answer = json.loads(line)
    except ValueError as e:
        raise AuditOutcomeUnknown("the agent sent an unreadable answer: %r" % line[:200], "connection") from e
    if not isinstance(answer, dict):
        raise AuditOutcomeUnknown("the agent sent an unreadable answer: %r" % line[:200], "connection")
    return answer


def outcome(answer: Mapping[str, Any]) -> Receipt:
    """The receipt of an answer, or its error raised."""
    if "error" in answer:
        raise error_from_answer(answer)
    return receipt_from_answer(answer)
