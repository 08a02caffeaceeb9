"""Record audit events through a local ``auditwal agent``.

>>> from auditwal_client import AuditService, AuditUnavailable
>>> audit = AuditService()              # AUDIT_MODE, AUDIT_SAMPLE_RATE, AUDITWAL_SOCKET
>>> receipt = audit.log_event("admin.user.disabled", actor_id="7", target_type="user",
...                           target_id="42", mode="sync")
>>> receipt.row_id                      # committed in PostgreSQL

Every receipt means what its mode promises (docs/agent.md): once
``log_event`` returned, the process may exit or be killed and the event is
not lost. Failures are typed: :class:`AuditRejected` (the event is refused as
it is), :class:`AuditUnavailable` (the agent or the database cannot take it
now) and its subclass :class:`AuditOutcomeUnknown` (sent, no answer: it may
be stored). Standard library only.
"""

from ._protocol import (
    EVENT_FIELDS,
    MODES,
    PEER_KEY,
    AuditDuplicate,
    AuditError,
    AuditOutcomeUnknown,
    AuditRejected,
    AuditUnavailable,
    Receipt,
)
from .aio import AsyncAgentClient
from .client import AgentClient
from .service import AsyncAuditService, AuditService

__all__ = [
    "AgentClient",
    "AsyncAgentClient",
    "AsyncAuditService",
    "AuditDuplicate",
    "AuditError",
    "AuditOutcomeUnknown",
    "AuditRejected",
    "AuditService",
    "AuditUnavailable",
    "EVENT_FIELDS",
    "MODES",
    "PEER_KEY",
    "Receipt",
]
