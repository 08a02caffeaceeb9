"""Drives the FastAPI example over HTTP, as ``run.py`` starts it (a real
agent, a real PostgreSQL, uvicorn): user endpoints are audited in the
configured mode and reach the table through the agent's loader; admin
endpoints return the audit id of a committed row; with the agent gone, an
admin action is refused and a user action still succeeds."""

import glob
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")

HERE = Path(__file__).resolve().parent


def psql(url, sql):
    exe = shutil.which("psql") or sorted(glob.glob("/usr/lib/postgresql/*/bin/psql"))[-1]
    out = subprocess.run([exe, url, "-X", "-At", "-c", sql], check=True, capture_output=True, text=True)
    return [line.split("|") for line in out.stdout.splitlines() if line]


def post(url, path, body, user):
    req = urllib.request.Request(
        url + path,
        data=json.dumps(body).encode(),
        headers={"Content-Type": "application/json", "X-User": user},
        method="POST",
    )
    try:
        with urllib.request.urlopen(req, timeout=30) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


@pytest.fixture
def service():
    env = dict(os.environ, AUDIT_MODE="async")
    env.pop("DATABASE_URL", None)
    proc = subprocess.Popen(
        [sys.executable, str(HERE / "run.py"), "--port", "0"], stdout=subprocess.PIPE, text=True, env=env
    )
    line = proc.stdout.readline()
    if not line:
        pytest.fail("run.py did not start (exit %s)" % proc.wait(30))
    yield json.loads(line)
    proc.send_signal(signal.SIGTERM)
    proc.wait(60)


def test_user_actions_are_audited_async_and_admin_actions_sync_with_the_audit_id(service):
    url, db = service["url"], service["database_url"]
    status, created = post(url, "/urls", {"long_url": "https://example.org/a"}, "alice")
    assert status == 201
    status, bulk = post(url, "/urls/bulk", [{"long_url": "https://example.org/%d" % i} for i in range(3)], "alice")
    assert status == 201 and len(bulk["slugs"]) == 3
    status, disabled = post(url, "/admin/users/alice/disable", {"reason": "spam"}, "root")
    assert status == 200
    # Sync: the row is committed when the response carries its id.
    rows = psql(db, "SELECT action, actor_id, target_id, reason FROM audit_events WHERE id = %d" % disabled["audit_id"])
    assert rows == [["admin.user.disabled", "root", "alice", "spam"]]
    status, _ = post(url, "/urls", {"long_url": "https://example.org/b"}, "alice")
    assert status == 403, "the disabled user is refused"
    status, override = post(url, "/admin/urls/%s/safety-override" % created["slug"], {"reason": "phishing"}, "root")
    assert status == 200 and override["unsafe"] is True and override["audit_id"] > disabled["audit_id"]
    # Async: in the agent's WAL at once, in the table once the agent's loader ran.
    deadline = time.monotonic() + 30
    while True:
        actions = sorted(r[0] for r in psql(db, "SELECT action FROM audit_events"))
        if len(actions) >= 4 or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    assert actions == ["admin.url.safety_override", "admin.user.disabled", "url.bulk_import", "url.created"]
    created_row = psql(db, "SELECT after->>'long_url', ip FROM audit_events WHERE action = 'url.created'")
    assert created_row == [["https://example.org/a", "127.0.0.1"]]


def test_without_the_agent_admin_actions_are_refused_and_user_actions_go_on(service):
    url = service["url"]
    os.kill(service["agent_pid"], signal.SIGKILL)
    time.sleep(0.2)
    status, body = post(url, "/admin/users/bob/disable", {"reason": "spam"}, "root")
    assert status == 503, body
    assert "refused" in body["detail"]
    status, _ = post(url, "/urls", {"long_url": "https://example.org/c"}, "bob")
    assert status == 201, "bob was not disabled, and a user action does not wait for the audit"
