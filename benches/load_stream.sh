# Sourced by load.sh for LOAD_STREAM_ROUNDS (default 3; 0 skips): streamed completions,
# the shape most of an LLM gateway's traffic has, through the same direct, nginx and
# kg-1key as the main table.
#
# The request is a POST with `"stream": true` to a path ending in /completions, so keygate
# does what it does for a real streamed chat completion: it reads the request body whole
# and asks for usage (`stream_options.include_usage`), meters every event of the answer,
# and takes the usage chunk back out, since this client did not ask for it. nginx passes
# the same bytes through unbuffered. The upstream answers every such request with the
# same 22-event stream (load.sh's SSE_BODY: 20 content deltas, the finish, the usage
# chunk, [DONE]) in one response of about 4 KiB; it does not pace the events, so this
# measures the per-byte and per-event work, not a slow stream's idle time.
#
# Before the rounds it checks what a client gets through keygate (the 21 events and
# [DONE], without the usage chunk) and after them that every row keygate recorded for the
# stream path carries the stream's 32 tokens: a table of numbers for requests keygate did
# not fully meter would mean nothing.
#
# Printed: load.sh's table for these rounds (stream-rounds.tsv, stream-summary.txt), with
# the ratios to nginx and direct, then the billed-row check.
#
# Then the same through a paced upstream (LOAD_STREAM_PACED=1, the default; 0 skips):
# `keygate demo-upstream` sends each event as a frame of its own, LOAD_STREAM_INTERVAL
# (2ms) apart, 20 content events per answer, as a model generating tokens does. A
# second nginx and a second keygate (kg-1key's config, this upstream) go in front of it.
# Closed-loop wrk then cannot saturate anything (each request lasts about 64 ms), so the
# number that matters is CPU per request: the per-frame work a real stream costs (a
# read, the meter, the filter and a write per event). Its own table
# (stream-paced-rounds.tsv, stream-paced-summary.txt, rows named as in the main table);
# the billed-row check asks that every answered request has one and the same token
# count, the demo's 20 completion tokens plus the prompt's.
#
# Uses from load.sh: WORK OUT TSV HWM STREAM_PATH CONNS LIGHT_CONNS DURATION
# LIGHT_DURATION VARIANTS MANY PORT PID_OF BIN_OF ENV_OF UP_PID UP_PORT BASE NGINX PIDS AUTH
# ROUND_COLUMNS run_round side_rounds summarize nginx_proxy_conf wait_http tree mem_kb sql log die.

STREAM_REQUEST='{"model":"demo-1","stream":true,"messages":[{"role":"user","content":"Say hello in twenty words."}]}'

path_rows() { # path tokens -> "billed unbilled gone other": the path's rows by kind
    sql -F ' ' -c "SELECT count(*) FILTER (WHERE status_code = 200 AND tokens_used = $2),
                          count(*) FILTER (WHERE status_code = 200 AND tokens_used IS DISTINCT FROM $2),
                          count(*) FILTER (WHERE status_code = 499 AND error_code = 'client_disconnected'),
                          count(*) FILTER (WHERE status_code NOT IN (200, 499))
                   FROM api_key_usage WHERE endpoint = '$1'"
}

# Every request keygate answered in $TSV's rounds (2xx, counted by wrk) has its row with
# the answer's tokens, once the writer has caught up. The only other rows allowed are
# 499s from the requests in flight when a wrk run stopped (at most its connections, each
# run): wrk closes its sockets then, and keygate records the hang-up.
rows_check() { # path tokens keygates what summary-file
    local path=$1 tokens=$2 kgs=$3 what=$4 summary=$5 served runs_conns billed=0 unbilled=0 gone=0 other=0 i
    served=$(awk -F'\t' 'NR > 1 && $1 ~ /^kg-/ { n += $13 - $12 } END { print n + 0 }' "$TSV")
    runs_conns=$(awk -F'\t' 'NR > 1 && $1 ~ /^kg-/ { n += $2 } END { print n + '"$CONNS"' * '"$kgs"' + 1 }' "$TSV")
    for i in $(seq 1 20); do
        read -r billed unbilled gone other <<<"$(path_rows "$path" "$tokens")"
        [ "$billed" -gt "$served" ] && break
        sleep 0.5
    done
    printf '\nrows for %s: %d billed with the %s'"'"'s %d tokens, %d answered without them, %d client hang-ups (499, at most %d: the connections of every wrk run), %d other; the keygates served %d in the rounds (plus the warm-up and the check)\n' \
        "$path" "$billed" "$what" "$tokens" "$unbilled" "$gone" "$runs_conns" "$other" "$served" | tee -a "$summary"
    [ "$billed" -gt "$served" ] || die "$what: fewer billed rows ($billed) than requests keygate served ($served)"
    [ "$unbilled" -eq 0 ] && [ "$other" -eq 0 ] || die "$what: rows without the $what's tokens (see above)"
    [ "$gone" -le "$runs_conns" ] || die "$what: more hang-ups ($gone) than connections in flight at the runs' ends"
}

post_script() { # name request -> a wrk script that POSTs the JSON request, written once
    # (a long bracket: Lua takes the body's backslash escapes as they are)
    local file=$WORK/$1.lua
    [ -f "$file" ] || cat >"$file" <<LUA
wrk.method = "POST"
wrk.body = [==[$2]==]
wrk.headers["Content-Type"] = "application/json"
LUA
    echo "$file"
}

stream_script() { # -> the wrk script that sends the streamed request
    post_script stream "$STREAM_REQUEST"
}

stream_pass() { # rounds
    local rounds=$1 variants=(direct nginx kg-1key) v body events script
    script=$(stream_script)
    # Extra one-key keygates (LOAD_EXTRA_BINS) join the rounds: an A/B of builds on streams.
    for v in "${VARIANTS[@]}"; do
        case $v in direct | nginx | kg-1key | kg-Nkeys) ;; *) [ -n "${MANY[$v]:-}" ] || variants+=("$v") ;; esac
    done
    body=$(curl -fsS -H "$AUTH" -H 'Content-Type: application/json' --data "$STREAM_REQUEST" \
        "http://127.0.0.1:${PORT[kg-1key]}$STREAM_PATH") || die "stream: keygate refused the streamed request"
    events=$(grep -c '^data: ' <<<"$body" || true)
    [ "$events" -eq 22 ] && grep -q '^data: \[DONE\]' <<<"$body" ||
        die "stream: keygate's answer has $events events, not the 21 and [DONE] the client should see"
    ! grep -q '"usage"' <<<"$body" || die "stream: keygate passed on a usage chunk the client did not ask for"
    grep -q '"usage"' < <(curl -fsS --data "$STREAM_REQUEST" "http://127.0.0.1:${PORT[nginx]}$STREAM_PATH") ||
        die "stream: the upstream's stream has no usage chunk"

    local main_tsv=$TSV
    TSV=$OUT/stream-rounds.tsv
    ROUND_PATH=$STREAM_PATH ROUND_SCRIPT=$script
    log ""
    log "streamed completions: $rounds rounds x ${DURATION}s at c=$CONNS and x ${LIGHT_DURATION}s at c=$LIGHT_CONNS"
    side_rounds "$rounds" "${variants[@]}"
    unset ROUND_PATH ROUND_SCRIPT
    log ""
    log "streamed completions (POST, \"stream\": true, 22 events of about 4 KiB in all):"
    summarize "$TSV" | tee "$OUT/stream-summary.txt"

    rows_check "$STREAM_PATH" 32 $((${#variants[@]} - 2)) stream "$OUT/stream-summary.txt"
    TSV=$main_tsv
    [ "${LOAD_STREAM_PACED:-1}" = 0 ] || stream_paced "$rounds"
}

stream_paced() { # rounds
    local rounds=$1 up=$((BASE + 50)) ngx=$((BASE + 51)) kg=$((BASE + 52)) p i name
    local interval=${LOAD_STREAM_INTERVAL:-2ms}
    for p in $up $ngx $kg; do
        if (exec 3<>"/dev/tcp/127.0.0.1/$p") 2>/dev/null; then die "port $p is in use (set LOAD_PORT_BASE)"; fi
    done
    "${BIN_OF[kg-1key]}" demo-upstream --listen "127.0.0.1:$up" --stream-interval "$interval" \
        2>>"$WORK/demo-upstream.log" &
    PORT[paced-direct]=$up PID_OF[paced-direct]=$!
    PIDS+=("$!")
    nginx_proxy_conf "$WORK/ngx-paced" "$up" "$ngx"
    "$NGINX" -c "$WORK/ngx-paced/nginx.conf" -p "$WORK/ngx-paced" 2>>"$WORK/nginx-paced.log" &
    PORT[paced-nginx]=$ngx PID_OF[paced-nginx]=$!
    PIDS+=("$!")
    name=kg-paced
    mkdir -p "$WORK/$name"
    sed -e "s|^listen = .*|listen = \"127.0.0.1:$kg\"|" \
        -e "s|^url = \"http://127.0.0.1:$UP_PORT\"|url = \"http://127.0.0.1:$up\"|" \
        -e "s|^spool_dir = .*|spool_dir = \"$WORK/$name/spool\"|" "$WORK/kg-1key/keygate.toml" >"$WORK/$name/keygate.toml"
    grep -q "127.0.0.1:$up" "$WORK/$name/keygate.toml" || die "stream: could not point $name at the paced upstream"
    # shellcheck disable=SC2086
    env ${ENV_OF[kg-1key]:-} "${BIN_OF[kg-1key]}" serve --config "$WORK/$name/keygate.toml" 2>>"$WORK/keygate-$name.log" &
    PORT[paced-kg]=$kg PID_OF[paced-kg]=$!
    PIDS+=("$!")
    wait_http "http://127.0.0.1:$up/healthz"
    wait_http "http://127.0.0.1:$kg/healthz"

    local request='{"model":"demo-1","stream":true,"max_tokens":20,"messages":[{"role":"user","content":"Say hello."}]}'
    local body events
    body=$(curl -fsS -H "$AUTH" -H 'Content-Type: application/json' --data "$request" \
        "http://127.0.0.1:$kg/v1/chat/completions") || die "stream: keygate refused the paced request"
    events=$(grep -c '^data: ' <<<"$body" || true)
    [ "$events" -ge 22 ] && ! grep -q '"usage":{' <<<"$body" ||
        die "stream: the paced answer through keygate has $events events or a usage chunk it should not"

    local main_tsv=$TSV
    TSV=$OUT/stream-paced-rounds.tsv
    ROUND_PATH=/v1/chat/completions ROUND_SCRIPT=$(post_script paced "$request")
    local saved_up=$UP_PID
    UP_PID=${PID_OF[paced-direct]} # run_round charges the upstream column to this one
    side_rounds "$rounds" paced-direct=direct paced-nginx=nginx paced-kg=kg-1key
    unset ROUND_PATH ROUND_SCRIPT
    UP_PID=$saved_up
    log ""
    log "paced streams (keygate demo-upstream, 20 content events $interval apart, one frame each; the upstream is keygate's demo):"
    summarize "$TSV" | tee "$OUT/stream-paced-summary.txt"

    # Every answer is the same length, so every row has the same count: the demo's 20
    # completion tokens plus the prompt's, which the check's own request shows.
    local served bad=0 good=0 want
    served=$(awk -F'\t' 'NR > 1 && $1 == "kg-1key" { n += $13 - $12 } END { print n + 0 }' "$TSV")
    want=$(sql -c "SELECT tokens_used FROM api_key_usage WHERE method = 'POST' AND endpoint = '/v1/chat/completions'
                   AND status_code = 200 ORDER BY \"timestamp\" LIMIT 1")
    [ "${want:-0}" -gt 20 ] || die "stream: the paced check's request was billed ${want:-no} tokens, not 20 and the prompt's"
    for i in $(seq 1 20); do
        read -r good bad <<<"$(sql -F ' ' -c "SELECT count(*) FILTER (WHERE status_code = 200 AND tokens_used = $want),
                                                   count(*) FILTER (WHERE status_code = 200 AND tokens_used IS DISTINCT FROM $want)
                                            FROM api_key_usage WHERE method = 'POST' AND endpoint = '/v1/chat/completions'")"
        [ "$good" -gt "$served" ] && break
        sleep 0.5
    done
    printf '\npaced rows: %d billed with %d tokens (20 completion and the prompt), %d answered with another count; keygate served %d in the rounds\n' \
        "$good" "$want" "$bad" "$served" | tee -a "$OUT/stream-paced-summary.txt"
    [ "$good" -gt "$served" ] && [ "$bad" -eq 0 ] || die "stream: paced requests without their tokens"
    TSV=$main_tsv
}
