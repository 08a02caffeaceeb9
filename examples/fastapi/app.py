"""A small URL shortener in FastAPI, audited through auditwal's agent: the
seed service's split, in Python.

- User endpoints (create a short URL, bulk import) audit in the configured
  mode, ``AUDIT_MODE`` (async by default): the event is in the agent's WAL
  before the response, and an audit failure is logged, never shown to the user.
- Admin endpoints (disable a user, override a URL's safety flag) audit
  ``sync`` whatever ``AUDIT_MODE`` says: the row is committed before the action
  is confirmed, the response carries the audit id (the row id), and when the
  audit cannot be stored the action is refused (503) and not carried out.

State is in memory; the audit trail is in PostgreSQL. ``run.py`` starts it
all on a throwaway database with one command.
"""

import logging
import secrets
from typing import Dict, List, Optional

from fastapi import FastAPI, Header, HTTPException, Request
from pydantic import BaseModel

from auditwal_client import AsyncAuditService, AuditError

log = logging.getLogger("shortener")

audit = AsyncAuditService()  # AUDIT_MODE, AUDIT_SAMPLE_RATE, AUDITWAL_SOCKET
app = FastAPI(title="shortener (auditwal example)")

urls: Dict[str, dict] = {}
disabled_users: Dict[str, str] = {}


class NewUrl(BaseModel):
    long_url: str


class Reason(BaseModel):
    reason: str


def request_fields(request: Request, x_request_id: Optional[str]) -> dict:
    return {
        "ip": request.client.host if request.client else None,
        "user_agent": request.headers.get("user-agent"),
        "request_id": x_request_id or secrets.token_hex(8),
    }


async def audit_user_action(**event) -> None:
    """User-facing: the configured mode; a failure is logged and the request goes on."""
    try:
        await audit.log_event(**event)
    except AuditError as e:
        log.warning("audit event %s not recorded: %s", event.get("action"), e)


async def audit_admin_action(**event) -> int:
    """Admin: sync, before the action is confirmed; no audit, no action."""
    try:
        receipt = await audit.log_event(mode="sync", **event)
    except AuditError as e:
        raise HTTPException(status_code=503, detail="audit unavailable, action refused: %s" % e) from e
    return receipt.row_id


@app.post("/urls", status_code=201)
async def create_url(
    body: NewUrl, request: Request, x_user: str = Header(...), x_request_id: Optional[str] = Header(None)
):
    if x_user in disabled_users:
        raise HTTPException(status_code=403, detail="user disabled")
    slug = secrets.token_urlsafe(5)
    urls[slug] = {"long_url": body.long_url, "owner": x_user, "unsafe": False}
    await audit_user_action(
        action="url.created",
        actor_type="user",
        actor_id=x_user,
        target_type="url",
        target_id=slug,
        outcome="success",
        after={"long_url": body.long_url},
        **request_fields(request, x_request_id),
    )
    return {"slug": slug}


@app.post("/urls/bulk", status_code=201)
async def bulk_import(
    body: List[NewUrl], request: Request, x_user: str = Header(...), x_request_id: Optional[str] = Header(None)
):
    slugs = []
    for item in body:
        slug = secrets.token_urlsafe(5)
        urls[slug] = {"long_url": item.long_url, "owner": x_user, "unsafe": False}
        slugs.append(slug)
    # One audit event for the whole batch, as the seed's bulk import does.
    await audit_user_action(
        action="url.bulk_import",
        actor_type="user",
        actor_id=x_user,
        target_type="url",
        outcome="success",
        metadata={"count": len(slugs)},
        **request_fields(request, x_request_id),
    )
    return {"slugs": slugs}


@app.post("/admin/users/{user_id}/disable")
async def disable_user(
    user_id: str, body: Reason, request: Request, x_user: str = Header(...), x_request_id: Optional[str] = Header(None)
):
    audit_id = await audit_admin_action(
        action="admin.user.disabled",
        actor_type="admin",
        actor_id=x_user,
        target_type="user",
        target_id=user_id,
        reason=body.reason,
        outcome="success",
        **request_fields(request, x_request_id),
    )
    disabled_users[user_id] = body.reason
    return {"status": "disabled", "audit_id": audit_id}


@app.post("/admin/urls/{slug}/safety-override")
async def safety_override(
    slug: str, body: Reason, request: Request, x_user: str = Header(...), x_request_id: Optional[str] = Header(None)
):
    if slug not in urls:
        raise HTTPException(status_code=404, detail="no such url")
    before = dict(urls[slug])
    audit_id = await audit_admin_action(
        action="admin.url.safety_override",
        actor_type="admin",
        actor_id=x_user,
        target_type="url",
        target_id=slug,
        reason=body.reason,
        before=before,
        after=dict(before, unsafe=not before["unsafe"]),
        outcome="success",
        **request_fields(request, x_request_id),
    )
    urls[slug]["unsafe"] = not before["unsafe"]
    return {"slug": slug, "unsafe": urls[slug]["unsafe"], "audit_id": audit_id}
