#!/usr/bin/env bash
# verify-db's rows per second beside its baseline, the same rows read by psql
# (`\copy (SELECT ...) TO /dev/null`: the server's sort and send, no checks).
# Not yet an `auditwal bench` case (issue 15's closing note). Usage:
#   cargo build --release && crates/bench/verify_db.sh [EVENTS]
set -euo pipefail
A="$(cd "$(dirname "$0")/../.." && pwd)/target/release/auditwal"
N="${1:-300000}"
work=$(mktemp -d)
trap 'kill "$holder" 2>/dev/null || true; rm -rf "$work"' EXIT
mkfifo "$work/hold"
sleep 1000000 > "$work/hold" & holder=$!
"$A" scratch-db < "$work/hold" > "$work/url" 2>/dev/null &
for _ in $(seq 100); do [ -s "$work/url" ] && break; sleep 0.2; done
URL=$(cat "$work/url")
"$A" keygen --out "$work/keys" >/dev/null
seq "$N" | awk '{printf "{\"action\":\"url.created\",\"actor_type\":\"user\",\"actor_id\":\"u%d\",\"target_type\":\"url\",\"target_id\":\"%d\",\"ip\":\"10.0.%d.%d\",\"user_agent\":\"Mozilla/5.0 (X11; Linux x86_64)\",\"request_id\":\"req-%d\",\"metadata\":{\"plan\":\"free\",\"n\":%d,\"ratio\":1.0}}\n", $1, $1, $1 % 250, $1 % 200, $1, $1}' \
  | AUDITWAL_CHAIN_KEY="$work/keys/auditwal.key" "$A" emit --wal-dir "$work/wal" --stream api >/dev/null
"$A" load --once --metrics-addr off --wal-dir "$work/wal" --database-url "$URL" 2>/dev/null
cols="lsn, chain_prev_lsn, chain_hash, wal_payload, sample_rate, event_id::text, (extract(epoch FROM occurred_at) * 1000000)::int8::text, action, actor_id, actor_type, target_type, target_id, target_name, tenant_id, outcome, reason, host(ip), user_agent, request_id, before::text, after::text, metadata::text"
for round in 1 2 3; do
  t0=$(date +%s.%N)
  psql "$URL" -qc "\\copy (SELECT $cols FROM audit_events WHERE stream_id = 'api' ORDER BY lsn) TO '/dev/null'"
  t1=$(date +%s.%N)
  out=$("$A" verify-db --json --database-url "$URL" --public-key "$work/keys/auditwal.pub" --stream api | tail -1)
  t2=$(date +%s.%N)
  echo "round $round: psql read $(echo "$N / ($t1 - $t0)" | bc) rows/s; verify-db $(echo "$N / ($t2 - $t1)" | bc) rows/s (wall, process start included); summary: $out"
done
