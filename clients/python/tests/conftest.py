"""What the tests run against: the real ``auditwal`` binary and a real
PostgreSQL.

``AUDITWAL_BIN`` names the binary (default: ``target/debug/auditwal`` of this
repository). ``DATABASE_URL`` names a server whose role may CREATE DATABASE;
without it, ``auditwal scratch-db`` starts a throwaway cluster for the session
(the same harness as the Rust tests) and stops it at the end. Each test that
needs a database gets a fresh one. The database is read with ``psql``, which
comes with the PostgreSQL server binaries.
"""

import glob
import json
import os
import shutil
import signal
import subprocess
import tempfile
import uuid
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[3]


def auditwal_bin() -> str:
    path = os.environ.get("AUDITWAL_BIN") or str(REPO / "target" / "debug" / "auditwal")
    if not os.path.exists(path):
        pytest.exit("no auditwal binary at %s: run `cargo build` or set AUDITWAL_BIN" % path, 2)
    return path


def psql_bin() -> str:
    found = shutil.which("psql") or next(iter(sorted(glob.glob("/usr/lib/postgresql/*/bin/psql"))), None)
    if not found:
        pytest.exit("psql not found (it comes with the PostgreSQL packages)", 2)
    return found


def with_database(url: str, name: str) -> str:
    head, _, query = url.partition("?")
    scheme, _, rest = head.partition("://")
    authority = rest.split("/", 1)[0]
    out = "%s://%s/%s" % (scheme, authority, name)
    return out + ("?" + query if query else "")


class Database:
    def __init__(self, url: str):
        self.url = url

    def query(self, sql: str) -> list:
        out = subprocess.run(
            [psql_bin(), self.url, "-X", "-At", "-v", "ON_ERROR_STOP=1", "-c", sql],
            check=True,
            capture_output=True,
            text=True,
        )
        return [line.split("|") for line in out.stdout.splitlines() if line]

    def event_ids(self) -> list:
        return [row[0] for row in self.query("SELECT event_id FROM audit_events")]


@pytest.fixture(scope="session")
def server_url():
    url = os.environ.get("DATABASE_URL")
    if url:
        yield url
        return
    proc = subprocess.Popen([auditwal_bin(), "scratch-db"], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    line = proc.stdout.readline().strip()
    if not line:
        proc.wait(30)
        pytest.exit("auditwal scratch-db did not start a PostgreSQL (exit %s)" % proc.returncode, 2)
    yield line
    proc.stdin.close()
    proc.wait(60)


@pytest.fixture
def db(server_url):
    name = "auditwal_py_%s" % uuid.uuid4().hex[:12]
    admin = Database(server_url)
    admin.query('CREATE DATABASE "%s"' % name)
    yield Database(with_database(server_url, name))
    admin.query('DROP DATABASE IF EXISTS "%s" WITH (FORCE)' % name)


class Agent:
    """A running ``auditwal agent``; SIGKILLed at the end of the test if still up."""

    def __init__(self, wal_dir: Path, database_url=None, env=None, args=()):
        self.wal_dir = wal_dir
        cmd = [auditwal_bin(), "agent", "--wal-dir", str(wal_dir)] + list(args)
        if database_url:
            cmd += ["--database-url", database_url]
        full_env = {k: v for k, v in os.environ.items() if k not in ("DATABASE_URL", "AUDIT_MODE", "AUDIT_SAMPLE_RATE")}
        full_env["RUST_LOG"] = "warn"
        full_env.update(env or {})
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, env=full_env, text=True)
        self.socket = None
        self.http = None
        wants_http = "--http" in args
        while self.socket is None or (wants_http and self.http is None):
            line = self.proc.stdout.readline()
            if not line:
                raise RuntimeError("the agent exited before listening (exit %s)" % self.proc.wait(10))
            kind, _, value = line.strip().partition(" ")
            if kind == "socket":
                self.socket = value
            elif kind == "http":
                self.http = value

    def kill(self):
        self.proc.kill()
        self.proc.wait(30)

    def terminate(self) -> int:
        self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(30)

    def records(self, stream: str = "agent") -> list:
        """The events in the agent's WAL stream (``auditwal inspect --json``)."""
        out = subprocess.run(
            [auditwal_bin(), "inspect", "--json", str(self.wal_dir / stream)],
            check=True,
            capture_output=True,
            text=True,
        )
        return [r for r in map(json.loads, out.stdout.splitlines()) if r.get("kind") == "event"]


@pytest.fixture
def start_agent():
    # A short path of its own: a Unix socket path must fit 108 bytes, which
    # pytest's tmp_path (named after the test) can exceed.
    root = Path(tempfile.mkdtemp(prefix="awpy-"))
    agents = []

    def start(database_url=None, env=None, args=()):
        agent = Agent(root / ("wal%d" % len(agents)), database_url, env, args)
        agents.append(agent)
        return agent

    yield start
    for agent in agents:
        if agent.proc.poll() is None:
            agent.kill()
    shutil.rmtree(root, ignore_errors=True)


def load_once(wal_dir: Path, database_url: str) -> None:
    subprocess.run(
        [
            auditwal_bin(),
            "load",
            "--once",
            "--no-progress",
            "--metrics-addr",
            "off",
            "--wal-dir",
            str(wal_dir),
            "--database-url",
            database_url,
        ],
        check=True,
        env=dict(os.environ, RUST_LOG="warn"),
    )
