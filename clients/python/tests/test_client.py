"""The Python client against a real agent and a real PostgreSQL: receipts per
mode, typed errors, configuration from the environment, fork safety, asyncio
pipelining, and every mode's promise across a SIGKILL of the client and of
the agent."""

import asyncio
import os
import subprocess
import sys
import textwrap

import pytest

from auditwal_client import (
    PEER_KEY,
    AsyncAuditService,
    AuditOutcomeUnknown,
    AuditRejected,
    AuditService,
    AuditUnavailable,
)

from conftest import load_once


def test_each_mode_answers_with_what_it_promises(start_agent, db):
    agent = start_agent(database_url=db.url)
    audit = AuditService(socket_path=agent.socket)
    sync = audit.log_event("admin.user.disabled", actor_id="7", target_type="user", target_id="42", mode="sync")
    durable = audit.log_event("user.login", actor_id="8", mode="durable")
    asynchronous = audit.log_event({"action": "url.created", "actor_id": "9", "after": {"slug": "x"}}, mode="async")
    assert sync.row_id is not None and sync.lsn is None
    assert durable.lsn is not None and asynchronous.lsn is not None
    # Sync: the row is committed before the answer, with the answered id.
    rows = db.query("SELECT id, action FROM audit_events WHERE event_id = '%s'" % sync.event_id)
    assert rows == [[str(sync.row_id), "admin.user.disabled"]]
    # Async and durable: in the agent's WAL, with their LSNs.
    by_id = {r["event_id"]: r for r in agent.records()}
    assert by_id[durable.event_id]["lsn"] == durable.lsn
    assert by_id[asynchronous.event_id]["after"] == {"slug": "x"}


def test_the_mode_and_socket_come_from_the_environment(start_agent, monkeypatch):
    agent = start_agent()
    monkeypatch.setenv("AUDIT_MODE", "durable")
    monkeypatch.setenv("AUDITWAL_SOCKET", agent.socket)
    audit = AuditService()
    assert audit.mode == "durable"
    assert audit.log_event("a.env").mode == "durable"
    assert audit.log_event("a.env", mode="async").mode == "async", "a per-call mode wins"
    monkeypatch.setenv("AUDIT_MODE", "later")
    with pytest.raises(ValueError, match="later"):
        AuditService()


def test_mode_off_sends_nothing():
    audit = AuditService(mode="off", socket_path="/nonexistent/agent.sock")
    assert audit.log_event("a.off") is None


def test_bad_events_raise_rejected_naming_the_field_and_the_next_call_works(start_agent):
    agent = start_agent()
    audit = AuditService(socket_path=agent.socket)
    cases = [
        (dict(actor_id="u"), "action"),
        (dict(action="a", actor_id=5), "actor_id"),
        (dict(action="a", ip="not-an-ip"), "ip"),
        (dict(action="a", outcome="maybe"), "outcome"),
        (dict(action="a", metadata=[1, 2]), "metadata"),
        (dict(action="a", actr_id="typo"), "actr_id"),
    ]
    for fields, field in cases:
        with pytest.raises(AuditRejected) as e:
            audit.log_event(fields)
        assert e.value.field == field, (fields, e.value.message)
        assert audit.log_event("a.after.bad").lsn is not None
    with pytest.raises(AuditRejected) as e:
        audit.log_event("a", reason="x" * 1_000_000)
    assert e.value.kind == "too_large"
    with pytest.raises(AuditRejected) as e:
        audit.log_event("a", mode="eventually")
    assert "eventually" in str(e.value)


def test_a_sync_call_without_a_database_raises_unavailable(start_agent):
    agent = start_agent()
    audit = AuditService(socket_path=agent.socket)
    with pytest.raises(AuditUnavailable) as e:
        audit.log_event("admin.x", mode="sync")
    assert not isinstance(e.value, AuditRejected)
    assert e.value.field == "mode"


def test_no_agent_raises_unavailable_and_a_dead_one_outcome_unknown(start_agent):
    with pytest.raises(AuditUnavailable):
        AuditService(socket_path="/nonexistent/agent.sock").log_event("a")
    agent = start_agent()
    audit = AuditService(socket_path=agent.socket)
    audit.log_event("a.before")
    agent.kill()
    with pytest.raises(AuditUnavailable) as e:
        audit.log_event("a.after")
    # The request may have been written before the agent's death was seen.
    assert isinstance(e.value, (AuditOutcomeUnknown, AuditUnavailable))


def test_sampled_mode_keeps_what_the_agent_samples_and_a_rate_mismatch_is_refused(start_agent):
    agent = start_agent(env={"AUDIT_SAMPLE_RATE": "0.5", "AUDIT_FORCE_KEEP_ACTIONS": "none"})
    audit = AuditService(mode="sampled", sample_rate=0.5, socket_path=agent.socket)
    receipts = [audit.log_event("page.viewed", request_id="req-%d" % i) for i in range(200)]
    kept = [r for r in receipts if r.kept]
    assert 40 < len(kept) < 160
    assert all(r.lsn is not None and r.sample_rate == 0.5 for r in kept)
    stored = {r["event_id"] for r in agent.records()}
    assert stored == {r.event_id for r in kept}
    wrong = AuditService(mode="sampled", sample_rate=0.1, socket_path=agent.socket)
    with pytest.raises(AuditRejected) as e:
        wrong.log_event("page.viewed")
    assert e.value.field == "sample_rate"


def _event_id_from_a_child(record):
    """Forks; the child calls ``record()`` and hands the receipt's event id
    back through a pipe. Returns the child's pid and that id, once the child
    exited 0."""
    r, w = os.pipe()
    child = os.fork()
    if child == 0:
        code = 1
        try:
            receipt = record()
            os.write(w, receipt.event_id.encode())
            code = 0
        finally:
            os._exit(code)
    os.close(w)
    _, status = os.waitpid(child, 0)
    assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0
    child_event = os.read(r, 100).decode()
    os.close(r)
    return child, child_event


def test_a_forked_child_connects_anew_and_is_stamped_with_its_own_pid(start_agent):
    agent = start_agent()
    audit = AuditService(mode="async", socket_path=agent.socket)
    audit.log_event("fork.parent.before")
    child, child_event = _event_id_from_a_child(lambda: audit.log_event("fork.child"))
    after = audit.log_event("fork.parent.after")
    peers = {rec["event_id"]: rec["metadata"][PEER_KEY] for rec in agent.records()}
    assert peers[child_event]["pid"] == child, "the child used its own connection"
    assert peers[after.event_id]["pid"] == os.getpid(), "the parent's connection still works"
    assert peers[after.event_id]["uid"] == os.getuid()


def test_asyncio_callers_are_pipelined_and_each_gets_its_own_answer(start_agent, db):
    agent = start_agent(database_url=db.url)

    async def main():
        audit = AsyncAuditService(mode="async", socket_path=agent.socket)
        calls = [
            audit.log_event("aio.event", request_id=str(i), mode="sync" if i % 10 == 0 else None) for i in range(300)
        ]
        calls.append(audit.log_event({"actor_id": "no action"}))
        results = await asyncio.gather(*calls, return_exceptions=True)
        await audit.close()
        return results

    results = asyncio.run(main())
    receipts, errors = results[:-1], results[-1:]
    assert isinstance(errors[0], AuditRejected) and errors[0].field == "action"
    assert len({r.event_id for r in receipts}) == 300
    lsns = [r.lsn for r in receipts if r.mode == "async"]
    assert len(set(lsns)) == len(lsns) == 270
    sync_rows = {r.event_id: r.row_id for r in receipts if r.mode == "sync"}
    stored = dict(db.query("SELECT event_id, id FROM audit_events"))
    assert {k: str(v) for k, v in sync_rows.items()} == stored


CLIENT_THEN_SIGKILL = textwrap.dedent(
    """
    import os, signal, sys
    from auditwal_client import AuditService
    audit = AuditService(socket_path=sys.argv[1], sample_rate=0.5)
    modes = ["async", "durable", "sync", "sampled"]
    for i in range(200):
        mode = modes[i % 4]
        r = audit.log_event("py.kill", request_id="k-%d" % i, mode=mode)
        print(mode, r.event_id, r.row_id or "-", "out" if r.sampled_out else "kept", flush=True)
    os.kill(os.getpid(), signal.SIGKILL)
    """
)


def test_every_answered_event_survives_a_sigkill_of_the_client_and_then_of_the_agent(start_agent, db):
    agent = start_agent(database_url=db.url, env={"AUDIT_SAMPLE_RATE": "0.5", "AUDIT_FORCE_KEEP_ACTIONS": "none"})
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))
    proc = subprocess.run(
        [sys.executable, "-c", CLIENT_THEN_SIGKILL, agent.socket], capture_output=True, text=True, env=env
    )
    assert proc.returncode == -9, proc.stderr
    answered = [line.split() for line in proc.stdout.splitlines()]
    assert len(answered) == 200
    agent.kill()
    kept = {event_id for mode, event_id, _, fate in answered if fate == "kept"}
    assert 100 < len(kept) < 200, "some sampled events kept, some not"
    # Sync: committed before the answer, with that row id.
    sync = {event_id: row_id for mode, event_id, row_id, _ in answered if mode == "sync"}
    stored_sync = dict(db.query("SELECT event_id, id FROM audit_events"))
    assert stored_sync == sync
    # The rest: in the WAL, loaded exactly once.
    load_once(agent.wal_dir, db.url)
    stored = db.event_ids()
    assert len(stored) == len(set(stored))
    assert set(stored) == kept


def test_an_asyncio_service_forked_after_use_connects_anew_in_the_child(start_agent):
    agent = start_agent()
    audit = AsyncAuditService(mode="async", socket_path=agent.socket)
    asyncio.run(audit.log_event("aio.fork.parent"))
    child, child_event = _event_id_from_a_child(lambda: asyncio.run(audit.log_event("aio.fork.child")))
    peers = {rec["event_id"]: rec["metadata"][PEER_KEY] for rec in agent.records()}
    assert peers[child_event]["pid"] == child
