# Sourced by load.sh for LOAD_POST_ROUNDS (default 3; 0 skips): non-streamed chat
# completions with a conversation in the request, through the same direct, nginx and
# kg-1key as the main table.
#
# The main table's GET has no request body. A real completion request carries the
# conversation so far, a few KiB of JSON, and keygate reads every request body to a path
# ending in /completions whole, to find out whether it streams (`stream_usage`). This pass
# sends post_request's body: 3.2 KiB, a system prompt and 12 turns, with quotes and non-ASCII
# text escaped as JSON encoders write them, and no `stream`. nginx buffers the same body
# (`proxy_request_buffering` is on by default) and passes it on. The upstream answers
# with the main table's JSON body.
#
# Before the rounds it checks that keygate passes the upstream's answer on unchanged, and
# after them that every request keygate answered has its row with the answer's 26 tokens.
#
# Printed: load.sh's table for these rounds (post-rounds.tsv, post-summary.txt), with
# the ratios to nginx and direct, then the billed-row check.
#
# Uses from load.sh: WORK OUT TSV CONNS LIGHT_CONNS LIGHT_DURATION VARIANTS MANY PORT
# BODY AUTH side_rounds summarize log die; from load_stream.sh: post_script rows_check.

POST_PATH=/v1/chat/post/completions
# post_script (the wrk script) and rows_check (the billed-row check) are the stream pass's.
declare -F post_script >/dev/null || . benches/load_stream.sh

post_request() { # -> the request body: about 3.2 KiB, no `stream`
    local i j role text="" msgs="" system=""
    for j in $(seq 1 8); do system+="You are a helpful assistant. "; done
    for i in $(seq 0 11); do
        role=user
        [ $((i % 2)) -eq 0 ] || role=assistant
        text=""
        for j in 1 2 3; do text+="Message number $i talks about the weather and \\\"quotes\\\" and caf\\u00e9. "; done
        msgs+=",{\"role\":\"$role\",\"content\":\"$text\"}"
    done
    printf '{"model":"demo-1","messages":[{"role":"system","content":"%s"}%s],"temperature":0.7,"max_tokens":256}' \
        "$system" "$msgs"
}

post_pass() { # rounds
    local rounds=$1 variants=(direct nginx kg-1key) v body script request
    request=$(post_request)
    script=$(post_script post "$request")
    # Extra one-key keygates (LOAD_EXTRA_BINS) join the rounds: an A/B of builds.
    for v in "${VARIANTS[@]}"; do
        case $v in direct | nginx | kg-1key | kg-Nkeys) ;; *) [ -n "${MANY[$v]:-}" ] || variants+=("$v") ;; esac
    done
    body=$(curl -fsS -H "$AUTH" -H 'Content-Type: application/json' --data "$request" \
        "http://127.0.0.1:${PORT[kg-1key]}$POST_PATH") || die "post: keygate refused the request"
    [ "$body" = "$BODY" ] || die "post: keygate's answer is not the upstream's: $body"

    local main_tsv=$TSV
    TSV=$OUT/post-rounds.tsv
    ROUND_PATH=$POST_PATH ROUND_SCRIPT=$script ROUND_DURATION=$LIGHT_DURATION
    log ""
    log "non-streamed completions with a ${#request}-byte request: $rounds rounds x ${LIGHT_DURATION}s at c=$CONNS and c=$LIGHT_CONNS"
    side_rounds "$rounds" "${variants[@]}"
    unset ROUND_PATH ROUND_SCRIPT ROUND_DURATION
    log ""
    log "non-streamed completions (POST, a ${#request}-byte conversation, the main table's answer):"
    summarize "$TSV" | tee "$OUT/post-summary.txt"
    rows_check "$POST_PATH" 26 $((${#variants[@]} - 2)) completion "$OUT/post-summary.txt"
    TSV=$main_tsv
}
