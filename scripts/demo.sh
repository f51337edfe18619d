#!/usr/bin/env bash
# Runs keygate for real: a throwaway PostgreSQL, the demo chat upstream, a seeded key,
# and keygate in front. Ctrl-C stops everything and removes the database.
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/lib.sh
PGBIN=$(pg_bindir)

PROXY_PORT=${KEYGATE_PORT:-8080}
ADMIN_PORT=${KEYGATE_ADMIN_PORT:-9090}
UPSTREAM_PORT=${DEMO_UPSTREAM_PORT:-8000}
PG_PORT=${DEMO_PG_PORT:-55432}

cargo build --release --locked --bin keygate
BIN=${CARGO_TARGET_DIR:-target}/release/keygate

WORK=$(mktemp -d /tmp/keygate-demo.XXXXXX)
chmod 755 "$WORK"
[ "$(id -u)" -eq 0 ] && chown postgres "$WORK"
PIDS=()
cleanup() {
    trap - EXIT INT TERM
    for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
    wait 2>/dev/null || true
    as_pg "$PGBIN/pg_ctl" -D "$WORK/data" -m fast stop >/dev/null 2>&1 || true
    rm -rf "$WORK"
    echo "stopped; throwaway database removed"
}
trap cleanup EXIT INT TERM

echo "starting a throwaway PostgreSQL on 127.0.0.1:$PG_PORT"
as_pg "$PGBIN/initdb" -U postgres -A trust -E UTF8 --no-sync -D "$WORK/data" >/dev/null
as_pg "$PGBIN/pg_ctl" -D "$WORK/data" -l "$WORK/postgres.log" -w \
    -o "-p $PG_PORT -k $WORK -c listen_addresses=127.0.0.1" start >/dev/null
export DATABASE_URL="postgres://postgres@127.0.0.1:$PG_PORT/postgres"

"$BIN" migrate up
KEY=$("$BIN" seed)

"$BIN" demo-upstream --listen "127.0.0.1:$UPSTREAM_PORT" &
PIDS+=($!)

cat > "$WORK/keygate.toml" <<TOML
[server]
listen = "127.0.0.1:$PROXY_PORT"
admin_listen = "127.0.0.1:$ADMIN_PORT"

[upstream]
url = "http://127.0.0.1:$UPSTREAM_PORT"

[[routes]]
prefix = "/v1/chat"
methods = ["POST"]
scopes = ["chat"]
TOML
"$BIN" serve --config "$WORK/keygate.toml" &
PIDS+=($!)

for _ in $(seq 1 100); do
    curl -fsS "http://127.0.0.1:$PROXY_PORT/healthz" >/dev/null 2>&1 && break
    sleep 0.1
done

cat <<MSG

keygate is up on http://127.0.0.1:$PROXY_PORT in front of the demo upstream.
Your seeded test key (shown once): $KEY

Try it:
  curl -H 'Authorization: Bearer $KEY' \\
       http://127.0.0.1:$PROXY_PORT/chat \\
       -d '{"message": "Hello!"}'

  curl -N -H 'Authorization: Bearer $KEY' http://127.0.0.1:$PROXY_PORT/v1/chat/completions \\
       -d '{"model": "demo-1", "stream": true, "messages": [{"role": "user", "content": "Hi"}]}'

Readiness: curl http://127.0.0.1:$ADMIN_PORT/readyz
Admin CLI: DATABASE_URL=$DATABASE_URL $BIN keys list --org default
Press Ctrl-C to stop.
MSG
wait
