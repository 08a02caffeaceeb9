"""The Python side of `auditwal bench agent`: the realistic caller.

Run by the Rust bench with one JSON argument (socket, http address, database
URL, auditwal binary, scratch dir, events per case, callers, cases). For each
case and caller count it prints one JSON line on stdout: case, callers,
events, secs, p50_us, p99_us, p999_us (per-call latency, perf_counter_ns
around the call, after a warm-up). Several callers are processes (forked,
each with its own connection), as gunicorn workers are: a thread per caller
would measure the GIL. The pipelined case prints events/s only.
"""

import http.client
import json
import math
import multiprocessing
import os
import socket
import subprocess
import sys
import threading
import time
import uuid

from auditwal_client import AuditService

WARMUP = 200


def event(i, pid):
    return {
        "action": "url.created",
        "actor_type": "user",
        "actor_id": "user-%d" % (i % 1000),
        "target_type": "url",
        "target_id": "u%d-%d" % (pid, i),
        "tenant_id": "t1",
        "outcome": "success",
        "ip": "10.0.0.%d" % (i % 250 + 1),
        "request_id": "r-%d-%d" % (pid, i),
    }


def caller_insert_commit(cfg):
    import psycopg

    conn = psycopg.connect(cfg["database_url"], autocommit=False)
    cur = conn.cursor()
    sql = (
        "INSERT INTO audit_events (event_id, occurred_at, action, actor_type, actor_id, target_type, "
        "target_id, tenant_id, outcome, ip, request_id, sample_rate) "
        "VALUES (%s, now(), %s, %s, %s, %s, %s, %s, %s, %s::inet, %s, 1.0) RETURNING id"
    )

    def call(i):
        e = event(i, os.getpid())
        cur.execute(
            sql,
            (
                uuid.uuid4(),
                e["action"],
                e["actor_type"],
                e["actor_id"],
                e["target_type"],
                e["target_id"],
                e["tenant_id"],
                e["outcome"],
                e["ip"],
                e["request_id"],
            ),
        )
        cur.fetchone()
        conn.commit()

    return call, conn.close


def caller_agent(mode):
    def make(cfg):
        audit = AuditService(mode=mode, sample_rate=cfg["sample_rate"], socket_path=cfg["socket"])
        pid = os.getpid()
        return (lambda i: audit.log_event(event(i, pid))), audit.close

    return make


def caller_http(cfg):
    host, port = cfg["http"].rsplit(":", 1)
    conn = http.client.HTTPConnection(host, int(port))
    pid = os.getpid()
    headers = {"Content-Type": "application/json"}

    def call(i):
        conn.request("POST", "/v1/events?mode=async", json.dumps(event(i, pid)), headers)
        resp = conn.getresponse()
        body = resp.read()
        if resp.status != 200:
            raise RuntimeError("HTTP %d: %r" % (resp.status, body))

    return call, conn.close


def caller_emit(cfg):
    proc = subprocess.Popen(
        [cfg["auditwal"], "emit", "--wal-dir", cfg["emit_dir"], "--stream", "emit-%d" % os.getpid()],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        env=dict(os.environ, RUST_LOG="error"),
    )
    pid = os.getpid()

    def call(i):
        proc.stdin.write(json.dumps(event(i, pid)).encode() + b"\n")
        proc.stdin.flush()
        if not proc.stdout.readline():
            raise RuntimeError("auditwal emit stopped")

    def close():
        proc.stdin.close()
        proc.wait()

    return call, close


CALLERS = {
    "py-insert-commit": caller_insert_commit,
    "emit-pipe": caller_emit,
    "agent-async": caller_agent("async"),
    "agent-durable": caller_agent("durable"),
    "agent-sync": caller_agent("sync"),
    "agent-sampled": caller_agent("sampled"),
    "http-async": caller_http,
}


def run_caller(case, cfg, n, start_barrier, out):
    try:
        call, close = CALLERS[case](cfg)
        for i in range(WARMUP):
            call(-1 - i)
        lat = []
        start_barrier.wait()
        t0 = time.perf_counter_ns()
        for i in range(n):
            s = time.perf_counter_ns()
            call(i)
            lat.append(time.perf_counter_ns() - s)
        t1 = time.perf_counter_ns()
        close()
        out.send((t0, t1, lat, None))
    except BaseException as e:  # reported by the parent
        out.send((0, 0, [], repr(e)))


def percentile(sorted_ns, p):
    if not sorted_ns:
        return 0
    rank = max(1, min(len(sorted_ns), math.ceil(p / 100.0 * len(sorted_ns))))
    return sorted_ns[rank - 1]


def in_processes(count, target, args):
    """Runs ``target(*args, barrier, out)`` in ``count`` forked processes that
    share one start barrier; returns what each sent on its ``out`` pipe, in
    order, once all have exited."""
    ctx = multiprocessing.get_context("fork")
    barrier = ctx.Barrier(count)
    procs, pipes = [], []
    for _ in range(count):
        recv, send = ctx.Pipe(duplex=False)
        p = ctx.Process(target=target, args=args + (barrier, send))
        p.start()
        procs.append(p)
        pipes.append(recv)
    results = [r.recv() for r in pipes]
    for p in procs:
        p.join()
    return results


def measure(case, cfg, callers, events):
    per = max(1, events // callers)
    results = in_processes(callers, run_caller, (case, cfg, per))
    errors = [e for _, _, _, e in results if e]
    if errors:
        raise RuntimeError("%s: %s" % (case, errors[0]))
    start = min(t0 for t0, _, _, _ in results)
    end = max(t1 for _, t1, _, _ in results)
    lat = sorted(x for _, _, l, _ in results for x in l)
    return {
        "case": case,
        "callers": callers,
        "events": len(lat),
        "secs": (end - start) / 1e9,
        "p50_us": percentile(lat, 50) / 1000.0,
        "p99_us": percentile(lat, 99) / 1000.0,
        "p999_us": percentile(lat, 99.9) / 1000.0,
    }


def pipelined_client(cfg, n, batch, start_barrier, out):
    try:
        pid = os.getpid()
        lines = [
            (json.dumps({"id": i, "mode": "async", "event": event(i, pid)}, separators=(",", ":")) + "\n").encode()
            for i in range(n)
        ]
        payloads = [b"".join(lines[i : i + batch]) for i in range(0, n, batch)]
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.connect(cfg["socket"])
        start_barrier.wait()
        t0 = time.perf_counter_ns()
        sender = threading.Thread(target=lambda: [sock.sendall(p) for p in payloads])
        sender.start()
        seen, errors = 0, 0
        while seen < n:
            chunk = sock.recv(1 << 20)
            if not chunk:
                raise RuntimeError("the agent closed the connection after %d answers" % seen)
            seen += chunk.count(b"\n")
            errors += chunk.count(b'"error"')
        t1 = time.perf_counter_ns()
        sender.join()
        sock.close()
        out.send((t0, t1, n, errors, None))
    except BaseException as e:
        out.send((0, 0, 0, 0, repr(e)))


def measure_pipelined(cfg, clients, events):
    per = events // clients
    results = in_processes(clients, pipelined_client, (cfg, per, 512))
    failures = [e for *_, e in results if e]
    if failures:
        raise RuntimeError("agent-async-pipelined: %s" % failures[0])
    if any(r[3] for r in results):
        raise RuntimeError("agent-async-pipelined: %d error answers" % sum(r[3] for r in results))
    start = min(r[0] for r in results)
    end = max(r[1] for r in results)
    return {
        "case": "agent-async-pipelined",
        "callers": clients,
        "events": sum(r[2] for r in results),
        "secs": (end - start) / 1e9,
    }


def main():
    cfg = json.loads(sys.argv[1])
    for case in cfg["cases"]:
        if case == "agent-async-pipelined":
            print(json.dumps(measure_pipelined(cfg, cfg["pipelined_clients"], cfg["pipelined_events"])), flush=True)
            continue
        for callers in cfg["callers"]:
            print(json.dumps(measure(case, cfg, callers, cfg["events"])), flush=True)


if __name__ == "__main__":
    main()
