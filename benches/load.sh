#!/usr/bin/env bash
# benches/load.sh: keygate against nginx, side by side, in one run, on loopback.
#
# Starts one fast upstream (nginx, 1 worker, `return 200` with a 300-byte chat-completion
# JSON body that carries `usage`), a plain nginx reverse proxy in front of it (1 worker,
# upstream keep-alive), a throwaway PostgreSQL (as scripts/demo.sh does), and keygate
# in front of the same upstream with authentication, rate limits and usage recording all
# on (its org has a 2e9 per-minute limit and monthly quota, so nothing is refused).
# Then interleaved rounds, rotating the order each round, of:
#   direct   wrk -> upstream
#   nginx    wrk -> nginx proxy_pass -> upstream
#   kg-1key  wrk -> keygate -> upstream, one key (cached after the first request)
#   kg-Nkeys wrk -> keygate -> upstream, LOAD_KEYS keys rotated by a wrk Lua script (no
#            warm-up: first a short cold pass, row kg-Nkeys-cold, where every request is
#            a cache miss and a limiter seed; then the rounds, which are cache hits)
# at LOAD_CONNS connections (saturating) and LOAD_LIGHT_CONNS (light load, added latency).
# For each round: RPS, p50/p99 (wrk --latency), CPU microseconds per request of the proxy
# process (utime+stime delta from /proc/PID/stat, taken after the process went idle so a
# writer's trailing work is counted), of the upstream, of PostgreSQL and of wrk itself,
# and RSS; at the end a table of medians with keygate/nginx and keygate/direct ratios,
# and each proxy's peak RSS (VmHWM).
#
# Usage: benches/load.sh   (about 16 minutes plus the build, 4 without the close, POST, flood and stream passes; root or sudo to install packages)
# Knobs (environment): LOAD_ROUNDS=3 LOAD_DURATION=8 LOAD_LIGHT_DURATION=5
#   LOAD_LIGHT_ROUNDS=LOAD_ROUNDS (0 skips the light-load rounds)
#   LOAD_COLD_DURATION=2: the many-keys variants' cold pass (all cache misses), first
#   LOAD_CONNS=50 LOAD_LIGHT_CONNS=10 LOAD_KEYS=10000 LOAD_PORT_BASE=18400
#   LOAD_OUT=target/load (results: rounds.tsv, summary.txt, logs)
#   KEYGATE_BIN=path (skip the build and use this binary)
#   LOAD_PG_OPTS="-c name=value ..." extra PostgreSQL settings (default: stock settings)
#   LOAD_PERF=variant (e.g. kg-1key): `perf record` that variant's process during its
#     first saturating round, into $LOAD_OUT/perf-VARIANT.data (LOAD_PERF_ARGS adds
#     options, e.g. "--call-graph dwarf"); then `perf report -i ...`
#   LOAD_HOLD=1: start everything, warm up, print the addresses and pids, and keep the
#     stack up (for profiling by hand) until interrupted; no rounds are run. Stop it with
#     Ctrl-C, or `kill -TERM <script pid>` when it runs in the background (a background
#     job ignores SIGINT, and the stack would stay up)
#   LOAD_PERF_STAT=1: also count syscalls and context switches per request of each
#     proxy process (`perf stat`) in every round
#   LOAD_CALLGRIND="kg-1key kg-other ...": after the timed rounds, run each named keygate
#     variant again under callgrind (its own config, another port) and print user-space
#     instructions per request at LOAD_LIGHT_CONNS, with the ratio to the first named:
#     the stable number for an A/B of builds, which CPU time on this box is too noisy
#     for (benches/load_callgrind.sh; LOAD_CALLGRIND_DURATION=10, LOAD_CALLGRIND_WARMUP=5;
#     LOAD_CALLGRIND_CLOSE=1 sends `Connection: close`, a new connection per request;
#     LOAD_CALLGRIND_POST=1 sends load_post.sh's request instead of the GET;
#     LOAD_ROUNDS=0 skips the timed rounds). Installs valgrind when missing.
#   LOAD_CLOSE_ROUNDS=3 (0 skips): after the timed rounds, direct, nginx and the one-key
#     keygates again with `Connection: close` on every request (a new connection per
#     request, as clients without a pool make), LOAD_LIGHT_DURATION rounds at LOAD_CONNS
#     and LOAD_LIGHT_CONNS; its own table (close-rounds.tsv, close-summary.txt)
#   LOAD_POST_ROUNDS=3 (0 skips): after the timed rounds, non-streamed completions with a
#     3.2 KiB conversation in the request (benches/load_post.sh), which keygate reads whole
#     to see whether it streams, through direct, nginx and kg-1key, LOAD_LIGHT_DURATION
#     rounds at LOAD_CONNS and LOAD_LIGHT_CONNS; its own table (post-rounds.tsv,
#     post-summary.txt), and a check of the billed rows
#   LOAD_FLOOD_ROUNDS=3 (0 skips): after the timed rounds, the brief's flood target
#     (benches/load_flood.sh): the valid key's p50/p99 at LOAD_LIGHT_CONNS alone, beside
#     an equal load of the valid key, and beside a flood of random well-formed keys at
#     LOAD_FLOOD_CONNS (default LOAD_LIGHT_CONNS), against one keygate per auth config
#     (LOAD_FLOOD_CONFIGS="per-address spread uncapped preload"), with key lookups per second
#   LOAD_STREAM_ROUNDS=3 (0 skips): after the timed rounds, streamed completions
#     (benches/load_stream.sh): a POST with "stream": true to a path ending in
#     /completions, answered with a 22-event chat-completion event stream, through direct,
#     nginx and kg-1key at LOAD_CONNS and LOAD_LIGHT_CONNS: keygate reads the request body
#     to ask for usage, meters every event and takes the usage chunk back out. Its own
#     table (stream-rounds.tsv, stream-summary.txt), and a check of the billed rows.
#     Then paced streams (LOAD_STREAM_PACED=1; LOAD_STREAM_INTERVAL=2ms): keygate
#     demo-upstream's events one frame each, through a second nginx and keygate
#     (stream-paced-rounds.tsv, stream-paced-summary.txt)
#   LOAD_EXTRA_BINS="name=/path/to/keygate[,keys][,nousage][,nolimits][,env=K=V][,runtime=R][,workers=N]
#     [,batch=N][,writers=N][,flush=D][,nicebg=N] ..." (usage.batch_size, pool_size,
#     flush_interval; nicebg: every thread but the request workers at that nice value)
#     adds a variant `kg-name` per entry, measured in the same interleaved rounds: one
#     key, or with `keys` the many-keys script; usage or limits off; extra environment
#     (e.g. env=RUST_LOG=info for the access log); `server.runtime` and `server.workers`
#     (e.g. runtime=shared for tokio's work-stealing runtime). For A/B of builds and settings
#     (allocator, runtime). Each keygate is a process of its own, so RSS and HWM are per
#     variant. Example: cargo build --release --features mimalloc --target-dir target/mi
#     && LOAD_EXTRA_BINS="mi=target/mi/release/keygate" benches/load.sh
# wrk and nginx are installed with apt-get when missing (nginx-light; on a host with
# systemd that also starts the distribution's nginx service, which this script leaves
# alone). Every process the script starts is stopped on exit, and the database removed.
# Nothing is pinned to cores: all processes share the machine, as a sidecar does.
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/lib.sh

ROUNDS=${LOAD_ROUNDS:-3}
DURATION=${LOAD_DURATION:-8}
LIGHT_DURATION=${LOAD_LIGHT_DURATION:-5}
COLD_DURATION=${LOAD_COLD_DURATION:-2}
LIGHT_ROUNDS=${LOAD_LIGHT_ROUNDS:-$ROUNDS}
CONNS=${LOAD_CONNS:-50}
LIGHT_CONNS=${LOAD_LIGHT_CONNS:-10}
NKEYS=${LOAD_KEYS:-10000}
BASE=${LOAD_PORT_BASE:-18400}
OUT=${LOAD_OUT:-target/load}
UP_PORT=$BASE NGX_PORT=$((BASE + 1)) KG1_PORT=$((BASE + 2)) KGN_PORT=$((BASE + 3)) PG_PORT=$((BASE + 9))
PATH_Q=/v1/chat/completions
TICK=$(getconf CLK_TCK)

log() { printf '%s\n' "$*" >&2; }
die() { log "load.sh: $*"; exit 1; }

# --- tools ---------------------------------------------------------------------------
find_nginx() { command -v nginx 2>/dev/null || { [ -x /usr/sbin/nginx ] && echo /usr/sbin/nginx; } || true; }
need=()
command -v wrk >/dev/null 2>&1 || need+=(wrk)
command -v curl >/dev/null 2>&1 || need+=(curl)
command -v pgrep >/dev/null 2>&1 || need+=(procps)
[ -n "$(find_nginx)" ] || need+=(nginx-light)
[ -z "${LOAD_CALLGRIND:-}" ] || command -v callgrind_control >/dev/null 2>&1 || need+=(valgrind)
if ((${#need[@]})); then
    log "installing ${need[*]} with apt-get"
    sudo=""
    [ "$(id -u)" -ne 0 ] && sudo="sudo"
    $sudo env DEBIAN_FRONTEND=noninteractive apt-get update -q >&2
    $sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "${need[@]}" >&2
fi
NGINX=$(find_nginx)
[ -n "$NGINX" ] && command -v wrk >/dev/null || die "wrk or nginx missing after install"
PGBIN=$(pg_bindir)
PSQL=$PGBIN/psql
[ -x "$PSQL" ] || PSQL=$(command -v psql) || die "psql not found"

for p in $UP_PORT $NGX_PORT $KG1_PORT $KGN_PORT $PG_PORT; do
    if (exec 3<>"/dev/tcp/127.0.0.1/$p") 2>/dev/null; then die "port $p is in use (set LOAD_PORT_BASE)"; fi
done

if [ -n "${KEYGATE_BIN:-}" ]; then
    BIN=$KEYGATE_BIN
else
    log "building keygate (release)"
    cargo build --release --quiet
    BIN=${CARGO_TARGET_DIR:-target}/release/keygate
fi

# --- process bookkeeping -------------------------------------------------------------
WORK=$(mktemp -d /tmp/keygate-load.XXXXXX)
chmod 755 "$WORK"
mkdir -p "$OUT"
PIDS=()
PG_STARTED=0
cleanup() {
    trap - EXIT INT TERM
    for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
    for p in "${PIDS[@]}"; do wait "$p" 2>/dev/null || true; done
    if [ "$PG_STARTED" = 1 ]; then as_pg "$PGBIN/pg_ctl" -D "$WORK/data" -m fast stop >/dev/null 2>&1 || true; fi
    cp "$WORK"/*.log "$OUT"/ 2>/dev/null || true
    rm -rf "$WORK"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

wait_http() { # url [header]
    local i
    for i in $(seq 1 100); do
        if curl -fsS -o /dev/null ${2:+-H "$2"} "$1" 2>/dev/null; then return 0; fi
        sleep 0.1
    done
    die "$1 did not answer 2xx (logs in $OUT)"
}

# --- PostgreSQL, schema, keys -------------------------------------------------------------
log "starting a throwaway PostgreSQL on 127.0.0.1:$PG_PORT"
[ "$(id -u)" -eq 0 ] && chown postgres "$WORK"
as_pg "$PGBIN/initdb" -U postgres -A trust -E UTF8 --no-sync -D "$WORK/data" >/dev/null
as_pg "$PGBIN/pg_ctl" -D "$WORK/data" -l "$WORK/postgres.log" -w \
    -o "-p $PG_PORT -k $WORK -c listen_addresses=127.0.0.1 -c max_connections=200 ${LOAD_PG_OPTS:-}" start >/dev/null
PG_STARTED=1
export DATABASE_URL="postgres://postgres@127.0.0.1:$PG_PORT/postgres"
"$BIN" migrate up >/dev/null
KEY=$("$BIN" seed | tail -n 1)
sql() { "$PSQL" -qAt -v ON_ERROR_STOP=1 "$DATABASE_URL" "$@"; }
sql <<SQL
UPDATE organizations SET rate_limit_per_minute = 2000000000, monthly_request_limit = 2000000000;
CREATE TABLE load_keys AS
    SELECT i, 'pk_test_' || substr(md5(i::text) || md5((-i)::text), 1, 42) || 'A' AS k
    FROM generate_series(1, $NKEYS) AS i;
INSERT INTO api_keys (id, organization_id, key_prefix, key_hash, key_hint, name, environment, scopes)
    SELECT gen_random_uuid(), o.id, 'pk_test_', encode(sha256(convert_to(k, 'UTF8')), 'hex'), right(k, 4),
           'load ' || i, 'test', '["chat"]'
    FROM load_keys, organizations o WHERE o.slug = 'default';
SQL
sql -c "SELECT k FROM load_keys ORDER BY i" >"$WORK/keys.txt"
[ "$(wc -l <"$WORK/keys.txt")" -eq "$NKEYS" ] || die "key export failed"

# --- upstream and nginx proxy --------------------------------------------------------------
BODY='{"id":"chatcmpl-load","object":"chat.completion","created":1700000000,"model":"demo-1","choices":[{"index":0,"message":{"role":"assistant","content":"Hello! This is a fixed reply from the load-test upstream."},"finish_reason":"stop"}],"usage":{"prompt_tokens":12,"completion_tokens":14,"total_tokens":26}}'
nginx_conf() { # dir server-block
    mkdir -p "$1/tmp"
    cat >"$1/nginx.conf" <<NGINX
worker_processes 1;
daemon off;
pid $1/nginx.pid;
error_log $1/error.log warn;
events { worker_connections 8192; }
http {
    access_log off;
    client_body_temp_path $1/tmp/body; proxy_temp_path $1/tmp/proxy;
    fastcgi_temp_path $1/tmp/fcgi; uwsgi_temp_path $1/tmp/uwsgi; scgi_temp_path $1/tmp/scgi;
    keepalive_requests 10000000;
    keepalive_timeout 300s;
    $2
}
NGINX
}
# A streamed completion as an upstream that was asked for usage sends it: content in 20
# events, the finish, the usage chunk, [DONE] (load_stream.sh). No quote or `$` in it, as
# nginx would take those for its own.
STREAM_PATH=/v1/chat/stream/completions
SSE_BODY=$(
    ev() { printf 'data: {"id":"chatcmpl-load","object":"chat.completion.chunk","created":1700000000,"model":"demo-1","choices":%s}\n\n' "$1"; }
    for i in $(seq 1 20); do ev "[{\"index\":0,\"delta\":{\"content\":\"word$i \"},\"finish_reason\":null}]"; done
    ev '[{"index":0,"delta":{},"finish_reason":"stop"}]'
    printf 'data: {"id":"chatcmpl-load","object":"chat.completion.chunk","created":1700000000,"model":"demo-1","choices":[],"usage":{"prompt_tokens":12,"completion_tokens":20,"total_tokens":32}}\n\n'
    printf 'data: [DONE]\n\nx'
)
SSE_BODY=${SSE_BODY%x} # the x keeps $(...) from eating the final blank line
nginx_conf "$WORK/up" "server { listen 127.0.0.1:$UP_PORT backlog=4096;
        location / { default_type application/json; return 200 '$BODY'; }
        location $STREAM_PATH { default_type text/event-stream; return 200 '$SSE_BODY'; } }"
nginx_proxy_conf() { # dir upstream-port listen-port: the plain reverse proxy under test
    nginx_conf "$1" "upstream up { server 127.0.0.1:$2; keepalive 64; keepalive_requests 10000000; keepalive_timeout 300s; }
    server { listen 127.0.0.1:$3 backlog=4096;
        location / { proxy_pass http://up; proxy_http_version 1.1; proxy_set_header Connection \"\";
                     proxy_buffering off; } }"
}
nginx_proxy_conf "$WORK/ngx" "$UP_PORT" "$NGX_PORT"
"$NGINX" -c "$WORK/up/nginx.conf" -p "$WORK/up" 2>>"$WORK/nginx-up.log" &
UP_PID=$!
PIDS+=("$UP_PID")
"$NGINX" -c "$WORK/ngx/nginx.conf" -p "$WORK/ngx" 2>>"$WORK/nginx-proxy.log" &
NGX_PID=$!
PIDS+=("$NGX_PID")

# --- keygate instances -----------------------------------------------------------------
start_keygate() { # name binary port [usage limits env...] -> sets KG_STARTED_PID
    local name=$1 bin=$2 port=$3 usage=${4:-true} limits=${5:-true}
    shift $(($# < 5 ? $# : 5))
    mkdir -p "$WORK/$name"
    cat >"$WORK/$name/keygate.toml" <<TOML
[server]
listen = "127.0.0.1:$port"
admin_listen = ""
shutdown_grace = "2s"
${SERVER_EXTRA[$name]:-}

[upstream]
url = "http://127.0.0.1:$UP_PORT"

[database]
url = "$DATABASE_URL"

[limits]
enabled = $limits

[usage]
enabled = $usage
spool_dir = "$WORK/$name/spool"
${USAGE_EXTRA[$name]:-}

[log]
level = "warn"

[[routes]]
prefix = "/v1/chat"
methods = []
scopes = ["chat"]
TOML
    env "$@" "$bin" serve --config "$WORK/$name/keygate.toml" 2>>"$WORK/keygate-$name.log" &
    KG_STARTED_PID=$!
    PIDS+=("$KG_STARTED_PID")
}
declare -A PORT PID_OF MANY SERVER_EXTRA USAGE_EXTRA NICE_BG BIN_OF ENV_OF
BIN_OF[kg-1key]=$BIN BIN_OF[kg-Nkeys]=$BIN
VARIANTS=(direct nginx kg-1key kg-Nkeys)
PORT[direct]=$UP_PORT PID_OF[direct]=$UP_PID
PORT[nginx]=$NGX_PORT PID_OF[nginx]=$NGX_PID
start_keygate kg-1key "$BIN" "$KG1_PORT"
PORT[kg-1key]=$KG1_PORT PID_OF[kg-1key]=$KG_STARTED_PID
start_keygate kg-Nkeys "$BIN" "$KGN_PORT"
PORT[kg-Nkeys]=$KGN_PORT PID_OF[kg-Nkeys]=$KG_STARTED_PID MANY[kg-Nkeys]=1
port=$((BASE + 10))
for spec in ${LOAD_EXTRA_BINS:-}; do
    name=kg-${spec%%=*}
    IFS=, read -r -a opts <<<"${spec#*=}"
    usage=true limits=true envs=()
    for o in "${opts[@]:1}"; do
        case $o in
            keys) MANY[$name]=1 ;;
            nousage) usage=false ;;
            nolimits) limits=false ;;
            env=*) envs+=("${o#env=}") ;;
            runtime=*) SERVER_EXTRA[$name]+="runtime = \"${o#runtime=}\""$'\n' ;;
            workers=*) SERVER_EXTRA[$name]+="workers = ${o#workers=}"$'\n' ;;
            batch=*) USAGE_EXTRA[$name]+="batch_size = ${o#batch=}"$'\n' ;;
            writers=*) USAGE_EXTRA[$name]+="pool_size = ${o#writers=}"$'\n' ;;
            flush=*) USAGE_EXTRA[$name]+="flush_interval = \"${o#flush=}\""$'\n' ;;
            nicebg=*) NICE_BG[$name]=${o#nicebg=} ;;
            *) die "unknown option $o in LOAD_EXTRA_BINS" ;;
        esac
    done
    if (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null; then die "port $port is in use (set LOAD_PORT_BASE)"; fi
    start_keygate "$name" "${opts[0]}" "$port" "$usage" "$limits" "${envs[@]}"
    PORT[$name]=$port PID_OF[$name]=$KG_STARTED_PID BIN_OF[$name]=${opts[0]} ENV_OF[$name]="${envs[*]}"
    VARIANTS+=("$name")
    [ -z "${MANY[$name]:-}" ] || wait_http "http://127.0.0.1:$port$PATH_Q" "Authorization: Bearer $(head -n 1 "$WORK/keys.txt")"
    port=$((port + 1))
done

AUTH="Authorization: Bearer $KEY"
for v in "${VARIANTS[@]}"; do wait_http "http://127.0.0.1:${PORT[$v]}$PATH_Q" "$AUTH"; done
# nicebg=N: every thread of that keygate but its request workers at nice N (the usage
# writer, the limiter flush and the other background tasks), an experiment on whether
# they delay requests.
for v in "${!NICE_BG[@]}"; do
    for task in /proc/"${PID_OF[$v]}"/task/*; do
        case $(cat "$task/comm" 2>/dev/null) in
            keygate-worker*) ;;
            *) renice -n "${NICE_BG[$v]}" -p "${task##*/}" >/dev/null ;;
        esac
    done
done
wait_http "http://127.0.0.1:$KGN_PORT$PATH_Q" "Authorization: Bearer $(head -n 1 "$WORK/keys.txt")"

cat >"$WORK/keys.lua" <<'LUA'
-- Rotates through the keys in KEYS_FILE, one per request; requests are formatted once.
local requests = {}
function init(args)
    for line in io.lines(os.getenv("KEYS_FILE")) do
        requests[#requests + 1] = wrk.format("GET", os.getenv("KEYS_PATH"), { ["Authorization"] = "Bearer " .. line })
    end
end
local i = 0
function request()
    i = i % #requests + 1
    return requests[i]
end
LUA
export KEYS_FILE=$WORK/keys.txt KEYS_PATH=$PATH_Q

# --- measuring ---------------------------------------------------------------------------
# Process and its children (nginx master + worker; postmaster + backends).
tree() { local p; for p in "$@"; do echo "$p"; pgrep -P "$p" || true; done; }
ticks() { # pids... -> utime+stime clock ticks summed
    local files=() p
    for p in "$@"; do [ -r "/proc/$p/stat" ] && files+=("/proc/$p/stat"); done
    ((${#files[@]})) || { echo 0; return; }
    awk '{ sub(/^.*\) /, ""); t += $12 + $13 } END { print t + 0 }' "${files[@]}" 2>/dev/null || echo 0
}
mem_kb() { # field pids... -> VmRSS or VmHWM summed, kB
    local f=$1 p t=0 v
    shift
    for p in "$@"; do
        v=$(awk -v f="$f:" '$1 == f { print $2 }' "/proc/$p/status" 2>/dev/null || true)
        t=$((t + ${v:-0}))
    done
    echo "$t"
}
pg_pids() { tree "$(head -n 1 "$WORK/data/postmaster.pid")"; }
# PostgreSQL's CPU so far: live backends plus what exited backends left in the
# postmaster's cutime/cstime, so a backend ending mid-round is not lost.
pg_ticks() {
    local pm reaped
    pm=$(head -n 1 "$WORK/data/postmaster.pid")
    reaped=$(awk '{ sub(/^.*\) /, ""); print $14 + $15 }' "/proc/$pm/stat" 2>/dev/null || echo 0)
    # shellcheck disable=SC2046
    echo $(($(ticks $(tree "$pm")) + ${reaped:-0}))
}
# CPU seconds of this shell's reaped children, from a `times` output saved in $1 (`times`
# must run in this shell: in a $(...) subshell it would see only that subshell's children).
child_secs() { awk 'NR == 2 { split($1, u, /[ms]/); split($2, s, /[ms]/); printf "%.3f", u[1] * 60 + u[2] + s[1] * 60 + s[2] }' "$1"; }
# Waits until the proxy and the database stop burning CPU (usage writer, flushes), at
# most 5 s, so that trailing work is charged to the round that caused it.
settle() { # pids...
    local a b i
    a=$(ticks "$@")
    for i in $(seq 1 10); do
        sleep 0.5
        b=$(ticks "$@")
        [ $((b - a)) -le 1 ] && return 0
        a=$b
    done
}

TSV=$OUT/rounds.tsv
# The columns of every rounds table (run_round's rows, summarize's input).
ROUND_COLUMNS='variant\tconns\tround\trps\tp50_us\tp99_us\tproxy_us\tupstream_us\tdb_us\tclient_us\trss_kb\terrors\trequests\tsyscalls_req\tctxsw_req\n'
# shellcheck disable=SC2059
printf "$ROUND_COLUMNS" >"$TSV"

run_round() { # variant conns duration round [label]
    local v=$1 c=$2 d=$3 r=$4 label=${5:-$1} script=() proxy_pids up_pids db_pids perf_pid=""
    [ -n "${MANY[$v]:-}" ] && script=(-s "$WORK/keys.lua")
    # ROUND_SCRIPT and ROUND_PATH: another request shape (load_stream.sh's streamed POST);
    # ROUND_HEADER: one more request header (the connection-per-request pass).
    [ -n "${ROUND_SCRIPT:-}" ] && script=(-s "$ROUND_SCRIPT")
    [ -n "${ROUND_HEADER:-}" ] && script+=(-H "$ROUND_HEADER")
    proxy_pids=$(tree "${PID_OF[$v]}")
    up_pids=$(tree "$UP_PID")
    db_pids=$(pg_pids)
    # shellcheck disable=SC2086
    local p0 u0 d0 w0 p1 u1 d1 w1 out
    if [ -n "${LOAD_PERF:-}" ] && [ "$v" = "$LOAD_PERF" ] && [ "$r" = 1 ] && [ "$c" = "$CONNS" ]; then
        perf record -F 999 ${LOAD_PERF_ARGS:-} -p "${PID_OF[$v]}" -o "$OUT/perf-$v.data" -- sleep "$d" \
            >/dev/null 2>&1 &
        perf_pid=$!
    fi
    local stat_pid="" sys_n="" cs_n=""
    if [ -n "${LOAD_PERF_STAT:-}" ]; then
        rm -f "$WORK/pstat"
        perf stat -x, -e raw_syscalls:sys_enter,context-switches -o "$WORK/pstat" \
            -p "$(echo $proxy_pids | tr ' ' ,)" -- sleep "$d" >/dev/null 2>&1 &
        stat_pid=$!
    fi
    p0=$(ticks $proxy_pids) u0=$(ticks $up_pids) d0=$(pg_ticks)
    times >"$WORK/times0"
    out=$(timeout $((d + 30)) wrk -t1 -c"$c" -d"${d}s" --latency "${script[@]}" -H "$AUTH" \
        "http://127.0.0.1:${PORT[$v]}${ROUND_PATH:-$PATH_Q}")
    times >"$WORK/times1"
    w0=$(child_secs "$WORK/times0") w1=$(child_secs "$WORK/times1")
    [ -z "$perf_pid" ] || wait "$perf_pid" || true
    if [ -n "$stat_pid" ]; then
        wait "$stat_pid" || true
        sys_n=$(awk -F, '$3 ~ /sys_enter/ { print $1 }' "$WORK/pstat" 2>/dev/null)
        cs_n=$(awk -F, '$3 ~ /context-switches/ { print $1 }' "$WORK/pstat" 2>/dev/null)
    fi
    # shellcheck disable=SC2086
    settle $proxy_pids $db_pids
    # shellcheck disable=SC2086
    p1=$(ticks $proxy_pids) u1=$(ticks $up_pids) d1=$(pg_ticks)
    local rss
    # shellcheck disable=SC2086
    rss=$(mem_kb VmRSS $proxy_pids)
    printf '%s\n' "$out" >>"$OUT/wrk.log"
    printf '%s\n' "$out" | awk -v v="$label" -v c="$c" -v r="$r" -v tick="$TICK" -v rss="$rss" \
        -v dp=$((p1 - p0)) -v du=$((u1 - u0)) -v dd=$((d1 - d0)) -v dw="$w0 $w1" -v sys_n="${sys_n:-}" -v cs_n="${cs_n:-}" -v direct=$([ "$v" = direct ] && echo 1 || echo 0) '
        function us(x) { if (x ~ /us$/) return x + 0; if (x ~ /ms$/) return x * 1000; if (x ~ /s$/) return x * 1e6; return x + 0 }
        / 50% / { p50 = us($2) } / 99% / { p99 = us($2) }
        /requests in/ { n = $1 } /Requests\/sec/ { rps = $2 }
        /Non-2xx/ { err += $NF } /Socket errors/ { gsub(/,/, ""); err += $4 + $6 + $8 + $10 }
        END {
            split(dw, w, " ")
            per = n > 0 ? 1e6 / tick / n : 0
            proxy = direct ? "-" : sprintf("%.2f", dp * per)
            sys = (sys_n ~ /^[0-9]+$/ && n > 0) ? sprintf("%.2f", sys_n / n) : "-"
            cs = (cs_n ~ /^[0-9]+$/ && n > 0) ? sprintf("%.2f", cs_n / n) : "-"
            printf "%s\t%d\t%d\t%.0f\t%.0f\t%.0f\t%s\t%.2f\t%.2f\t%.2f\t%d\t%d\t%d\t%s\t%s\n",
                v, c, r, rps, p50, p99, proxy, du * per, dd * per, (w[2] - w[1]) * 1e6 / (n > 0 ? n : 1), rss, err, n,
                sys, cs
        }' | tee -a "$TSV" >&2
}

side_rounds() { # rounds variant[=label]... : into a fresh $TSV, a warm-up of each,
    # interleaved rounds at CONNS, then at LIGHT_CONNS, rows named by label (the main
    # table's names, so summarize's ratios work); then each variant's peak RSS into HWM
    # under its label. ROUND_PATH, ROUND_SCRIPT and ROUND_HEADER say what is sent;
    # ROUND_DURATION, when set, is every round's length. For the passes after the main
    # table (load_stream.sh, load_post.sh, the connection-per-request pass below).
    local rounds=$1 specs n c d r i v k
    shift
    specs=("$@") n=$#
    # shellcheck disable=SC2059
    printf "$ROUND_COLUMNS" >"$TSV"
    for k in "${specs[@]}"; do
        wrk -t1 -c"$CONNS" -d2s ${ROUND_SCRIPT:+-s "$ROUND_SCRIPT"} ${ROUND_HEADER:+-H "$ROUND_HEADER"} -H "$AUTH" \
            "http://127.0.0.1:${PORT[${k%%=*}]}${ROUND_PATH:-$PATH_Q}" >/dev/null
    done
    for c in "$CONNS" "$LIGHT_CONNS"; do
        d=$DURATION
        [ "$c" = "$CONNS" ] || d=$LIGHT_DURATION
        d=${ROUND_DURATION:-$d}
        for r in $(seq 1 "$rounds"); do
            for i in $(seq 0 $((n - 1))); do
                k=${specs[$(((i + r - 1) % n))]}
                run_round "${k%%=*}" "$c" "$d" "$r" "${k#*=}"
            done
        done
    done
    : >"$HWM"
    for k in "${specs[@]}"; do
        v=${k%%=*}
        # shellcheck disable=SC2046
        printf '%s\t%s\n' "${k#*=}" "$(mem_kb VmHWM $(tree "${PID_OF[$v]}"))" >>"$HWM"
    done
}

log ""
log "machine: $(nproc) CPUs, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2- | sed 's/^ //'), $(uname -r)"
log "load average before: $(cut -d' ' -f1-3 /proc/loadavg)"
log "nginx $("$NGINX" -v 2>&1 | sed 's/.*nginx\///'), $(wrk -v 2>&1 | head -n 1 | cut -d' ' -f1-2), keygate $(git rev-parse --short HEAD 2>/dev/null || echo '?')$(git diff --quiet 2>/dev/null || echo '+dirty')"
log "$ROUNDS rounds x ${DURATION}s at c=$CONNS, $LIGHT_ROUNDS x ${LIGHT_DURATION}s at c=$LIGHT_CONNS; $NKEYS keys; wrk -t1"
log ""
# Warm-up: connection pools and the single key's cache entry and limiter cell. Not for
# kg-Nkeys, whose cold pass is meant to be all misses.
for v in "${VARIANTS[@]}"; do
    [ -n "${MANY[$v]:-}" ] && continue
    wrk -t1 -c"$CONNS" -d2s -H "$AUTH" "http://127.0.0.1:${PORT[$v]}$PATH_Q" >/dev/null
done
if [ -n "${LOAD_HOLD:-}" ]; then
    for v in "${VARIANTS[@]}"; do log "$v: http://127.0.0.1:${PORT[$v]}$PATH_Q pid ${PID_OF[$v]}"; done
    log "key: $KEY; many keys: $WORK/keys.txt (wrk -s $WORK/keys.lua); DATABASE_URL=$DATABASE_URL"
    log "LOAD_HOLD: the stack stays up until this script is interrupted"
    while :; do sleep 1; done
fi
# shellcheck disable=SC2059
printf "$ROUND_COLUMNS" >&2
# The cold pass: each many-keys variant's first COLD_DURATION seconds after start, while
# every request is a key it has never seen (a cache miss, a lookup and a limiter seed),
# as after a restart with auth.preload off. Its own row, `<variant>-cold`; if it served
# more than LOAD_KEYS requests, later ones were hits and it says so.
for v in "${VARIANTS[@]}"; do
    [ -n "${MANY[$v]:-}" ] || continue
    run_round "$v" "$CONNS" "$COLD_DURATION" 1 "$v-cold"
    cold_n=$(tail -n 1 "$TSV" | cut -f13)
    [ "${cold_n:-0}" -le "$NKEYS" ] || log "note: $v-cold served $cold_n requests, more than the $NKEYS keys: the rest were cache hits"
done
n=${#VARIANTS[@]}
for r in $(seq 1 "$ROUNDS"); do
    for i in $(seq 0 $((n - 1))); do run_round "${VARIANTS[$(((i + r - 1) % n))]}" "$CONNS" "$DURATION" "$r"; done
done
for r in $(seq 1 "$LIGHT_ROUNDS"); do
    for i in $(seq 0 $((n - 1))); do run_round "${VARIANTS[$(((i + r - 1) % n))]}" "$LIGHT_CONNS" "$LIGHT_DURATION" "$r"; done
done
log "load average after: $(cut -d' ' -f1-3 /proc/loadavg)"

HWM=$OUT/hwm.tsv
: >"$HWM"
for v in "${VARIANTS[@]}"; do
    # shellcheck disable=SC2046
    printf '%s\t%s\n' "$v" "$(mem_kb VmHWM $(tree "${PID_OF[$v]}"))" >>"$HWM"
done

# --- summary: medians per variant and connection count ----------------------------------
summarize() { # rounds.tsv -> the table, per-request counters and added latency
awk -F'\t' -v hwmfile="$HWM" '
    function median(list,   a, n, i, j, t) {
        n = split(list, a, " ")
        for (i = 2; i <= n; i++) { t = a[i]; for (j = i - 1; j >= 1 && a[j] + 0 > t + 0; j--) a[j + 1] = a[j]; a[j + 1] = t }
        return n % 2 ? a[(n + 1) / 2] : (a[n / 2] + a[n / 2 + 1]) / 2
    }
    BEGIN { while ((getline line < hwmfile) > 0) { split(line, h, "\t"); hwm[h[1]] = h[2] } }
    NR == 1 { next }
    {
        k = $1 SUBSEP $2
        if (!(k in seen)) { seen[k] = 1; order[++nk] = k }
        rps[k] = rps[k] " " $4; p50[k] = p50[k] " " $5; p99[k] = p99[k] " " $6
        px[k] = px[k] " " ($7 == "-" ? 0 : $7); up[k] = up[k] " " $8; db[k] = db[k] " " $9; cl[k] = cl[k] " " $10
        err[k] += $12
        if ($14 != "-" && $14 != "") { sc[k] = sc[k] " " $14; cs[k] = cs[k] " " $15 }
    }
    END {
        for (i = 1; i <= nk; i++) {
            k = order[i]; split(k, kc, SUBSEP)
            R[k] = median(rps[k]); P50[k] = median(p50[k]); P99[k] = median(p99[k]); PX[k] = median(px[k])
        }
        printf "%-14s %5s %9s %8s %8s %9s %9s %8s %8s %8s %8s %9s %9s %8s\n", "variant", "conns", "RPS", "p50_us", "p99_us", "proxy_us", "upstr_us", "db_us", "wrk_us", "/nginx", "/direct", "cpu/nginx", "HWM_MiB", "errors"
        for (i = 1; i <= nk; i++) {
            k = order[i]; split(k, kc, SUBSEP); v = kc[1]; c = kc[2]
            n = "nginx" SUBSEP c; d = "direct" SUBSEP c
            rn = (n in R && R[n] > 0) ? sprintf("%.3f", R[k] / R[n]) : "-"
            rd = (d in R && R[d] > 0) ? sprintf("%.3f", R[k] / R[d]) : "-"
            cn = (v != "direct" && n in PX && PX[n] > 0) ? sprintf("%.3f", PX[k] / PX[n]) : "-"
            printf "%-14s %5d %9.0f %8.0f %8.0f %9s %9.2f %8.2f %8.2f %8s %8s %9s %9.1f %8d\n", v, c, R[k], P50[k], P99[k],
                (v == "direct" ? "-" : sprintf("%.2f", PX[k])), median(up[k]), median(db[k]), median(cl[k]), rn, rd, cn,
                hwm[v] / 1024, err[k]
        }
        for (i = 1; i <= nk; i++) {
            k = order[i]; split(k, kc, SUBSEP)
            if (k in sc) {
                if (!hdr++) printf "\nper request, in the proxy process (perf stat, median):\n"
                printf "  c=%-4d %-14s %6.2f syscalls, %5.2f context switches\n", kc[2], kc[1], median(sc[k]), median(cs[k])
            }
        }
        printf "\nadded latency over direct (median p50 / p99, us):\n"
        for (i = 1; i <= nk; i++) {
            k = order[i]; split(k, kc, SUBSEP); v = kc[1]; c = kc[2]; d = "direct" SUBSEP c
            if (v != "direct" && d in R) printf "  c=%-4d %-14s +%.0f / +%.0f\n", c, v, P50[k] - P50[d], P99[k] - P99[d]
        }
    }' "$1"
}
summarize "$TSV" | tee "$OUT/summary.txt"
# A new connection per request: the one-key variants again, every request sent with
# `Connection: close`, as clients without a connection pool send them (curl in a loop,
# a script's one-off calls). What this adds to the main table is each proxy's cost of a
# connection: the accept, registering the socket with a reactor, the connection's task
# and buffers, the close. Its own table (close-rounds.tsv, close-summary.txt).
if [ "${LOAD_CLOSE_ROUNDS:-3}" -gt 0 ]; then
    close_variants=()
    for v in "${VARIANTS[@]}"; do [ -n "${MANY[$v]:-}" ] || close_variants+=("$v"); done
    main_tsv=$TSV TSV=$OUT/close-rounds.tsv ROUND_HEADER='Connection: close' ROUND_DURATION=$LIGHT_DURATION
    log ""
    log "a new connection per request (Connection: close): ${LOAD_CLOSE_ROUNDS:-3} rounds x ${LIGHT_DURATION}s at c=$CONNS and c=$LIGHT_CONNS"
    side_rounds "${LOAD_CLOSE_ROUNDS:-3}" "${close_variants[@]}"
    unset ROUND_HEADER ROUND_DURATION
    log ""
    log "a new connection per request:"
    summarize "$TSV" | tee "$OUT/close-summary.txt"
    TSV=$main_tsv
fi
if [ "${LOAD_POST_ROUNDS:-3}" -gt 0 ]; then
    . benches/load_post.sh
    post_pass "${LOAD_POST_ROUNDS:-3}"
fi
if [ "${LOAD_FLOOD_ROUNDS:-3}" -gt 0 ]; then
    . benches/load_flood.sh
    flood_pass "${LOAD_FLOOD_ROUNDS:-3}"
fi
if [ "${LOAD_STREAM_ROUNDS:-3}" -gt 0 ]; then
    . benches/load_stream.sh
    stream_pass "${LOAD_STREAM_ROUNDS:-3}"
fi
if [ -n "${LOAD_CALLGRIND:-}" ]; then
    . benches/load_callgrind.sh
    # shellcheck disable=SC2086
    callgrind_pass ${LOAD_CALLGRIND//,/ }
fi
log ""
log "per-round rows: $TSV; summary: $OUT/summary.txt"
