"""Runs the FastAPI example on a throwaway database, with one command:

    python3 examples/fastapi/run.py [--port 8000]

It starts a private PostgreSQL (``auditwal scratch-db``; or uses
``DATABASE_URL``), an ``auditwal agent`` with the loader in-process
(``--load``) on a temporary WAL dir, and the app under uvicorn, then prints
one JSON line (``url``, ``database_url``, ``agent_pid``) and runs until
Ctrl-C or SIGTERM, when it stops all three. ``AUDIT_MODE`` (default async)
is the user endpoints' mode; admin endpoints are always sync. Needs
``pip install fastapi uvicorn`` and a built ``auditwal`` (``cargo build``;
``AUDITWAL_BIN`` names another).
"""

import argparse
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]


def auditwal_bin() -> str:
    if os.environ.get("AUDITWAL_BIN"):
        return os.environ["AUDITWAL_BIN"]
    for build in ("debug", "release"):
        path = REPO / "target" / build / "auditwal"
        if path.exists():
            return str(path)
    found = shutil.which("auditwal")
    if not found:
        sys.exit("run.py: no auditwal binary: run `cargo build`, or set AUDITWAL_BIN")
    return found


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_http(url: str, proc: subprocess.Popen, limit: float = 30.0) -> None:
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            sys.exit("run.py: the app exited (%s)" % proc.returncode)
        try:
            urllib.request.urlopen(url + "/docs", timeout=1).read()
            return
        except (urllib.error.URLError, OSError):
            time.sleep(0.1)
    sys.exit("run.py: the app did not answer within %ss" % limit)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, default=8000, help="0: any free port")
    args = parser.parse_args()
    port = args.port or free_port()
    binary = auditwal_bin()
    scratch = Path(tempfile.mkdtemp(prefix="awfa-"))
    procs = []
    stopping = []

    def stop(*_):
        stopping.append(True)

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    try:
        database_url = os.environ.get("DATABASE_URL")
        if not database_url:
            db = subprocess.Popen([binary, "scratch-db"], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
            procs.append(db)
            database_url = db.stdout.readline().strip()
            if not database_url:
                sys.exit("run.py: auditwal scratch-db could not start PostgreSQL")
        env = dict(os.environ, RUST_LOG=os.environ.get("RUST_LOG", "warn"))
        env.setdefault("AUDIT_MODE", "async")
        agent = subprocess.Popen(
            [binary, "agent", "--wal-dir", str(scratch / "wal"), "--database-url", database_url, "--load"],
            stdout=subprocess.PIPE,
            text=True,
            env=env,
        )
        procs.append(agent)
        line = agent.stdout.readline().strip()
        if not line.startswith("socket "):
            sys.exit("run.py: the agent did not start")
        env["AUDITWAL_SOCKET"] = line[len("socket ") :]
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO / "clients" / "python"), env.get("PYTHONPATH")]))
        app = subprocess.Popen(
            [sys.executable, "-m", "uvicorn", "app:app", "--host", "127.0.0.1", "--port", str(port), "--log-level", "warning"],
            cwd=str(HERE),
            env=env,
        )
        procs.append(app)
        url = "http://127.0.0.1:%d" % port
        wait_http(url, app)
        print(json.dumps({"url": url, "database_url": database_url, "agent_pid": agent.pid}), flush=True)
        # Only the app's exit ends the run: the agent dying is what the app
        # must survive (admin actions refused, user actions going on).
        while not stopping and app.poll() is None:
            time.sleep(0.2)
    finally:
        for p in reversed(procs):
            if p.poll() is None:
                if p.stdin is not None:
                    p.stdin.close()  # scratch-db stops when its stdin closes
                else:
                    p.send_signal(signal.SIGTERM)
                try:
                    p.wait(30)
                except subprocess.TimeoutExpired:
                    p.kill()
        shutil.rmtree(scratch, ignore_errors=True)


if __name__ == "__main__":
    main()
