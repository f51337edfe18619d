# Sourced by load.sh for LOAD_CALLGRIND: instructions per request of chosen keygate
# variants, counted by callgrind on the same stack after the timed rounds.
#
# Why: on a shared 2-vCPU box, CPU time per request moves by ±10-15% between rounds of
# one binary, so a change worth 1-5% cannot be seen in the timed rounds at all. The
# instruction count of the same requests through the same binary and config is stable to
# a fraction of a percent, which makes it the number an A/B of two builds is decided on.
# It counts user space only: the kernel's share (about half of keygate's CPU here) and
# the cost of cache misses are not in it, so it complements the timed rounds and does
# not replace them.
#
# Caveat: valgrind's virtual CPU has no SHA extensions, so the key digest falls back to
# sha2's portable code under it (about 3,500 instructions a request, against ~60 ns
# natively): the same for every variant, so ratios hold, absolute counts are high by that.
#
# Uses from load.sh: WORK OUT PATH_Q STREAM_PATH AUTH LIGHT_CONNS PIDS PORT MANY BIN_OF ENV_OF log die.
# LOAD_CALLGRIND_STREAM=1 counts the streamed completion of load_stream.sh instead of the GET.
# LOAD_CALLGRIND_POST=1 counts load_post.sh's non-streamed completion with a 3.2 KiB request.
# LOAD_CALLGRIND_CLOSE=1 sends every request with `Connection: close` (the close pass's
# shape), so the count includes what accepting and closing a connection costs.

callgrind_pass() { # variants... -> a table on stdout, also in $OUT/callgrind.txt
    local secs=${LOAD_CALLGRIND_DURATION:-10} warm=${LOAD_CALLGRIND_WARMUP:-5}
    local port=$((BASE + 30)) v first_ipr="" rows=()
    for v in "$@"; do
        [ -n "${BIN_OF[$v]:-}" ] || die "LOAD_CALLGRIND: $v is not a keygate variant (one of: ${!BIN_OF[*]})"
        if (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null; then die "port $port is in use (set LOAD_PORT_BASE)"; fi
        local dir=$WORK/cg-$v script=()
        mkdir -p "$dir"
        # The variant's own config, on another port and spool.
        sed -e "s|^listen = .*|listen = \"127.0.0.1:$port\"|" \
            -e "s|^spool_dir = .*|spool_dir = \"$dir/spool\"|" "$WORK/$v/keygate.toml" >"$dir/keygate.toml"
        # shellcheck disable=SC2086
        env ${ENV_OF[$v]:-} valgrind --tool=callgrind --callgrind-out-file="$dir/cg.out" \
            "${BIN_OF[$v]}" serve --config "$dir/keygate.toml" 2>>"$WORK/keygate-cg-$v.log" &
        local vpid=$! i
        PIDS+=("$vpid")
        for i in $(seq 1 600); do
            curl -fsS -o /dev/null -H "$AUTH" "http://127.0.0.1:$port$PATH_Q" 2>/dev/null && break
            kill -0 "$vpid" 2>/dev/null || die "$v under valgrind exited (log: $OUT/keygate-cg-$v.log)"
            sleep 0.1
        done
        [ -n "${MANY[$v]:-}" ] && script=(-s "$WORK/keys.lua")
        local path=$PATH_Q
        if [ -n "${LOAD_CALLGRIND_STREAM:-}" ]; then
            # The streamed completion of load_stream.sh instead of the plain GET.
            declare -F stream_script >/dev/null || . benches/load_stream.sh
            path=$STREAM_PATH script=(-s "$(stream_script)")
        fi
        if [ -n "${LOAD_CALLGRIND_POST:-}" ]; then
            # load_post.sh's non-streamed completion with a 3.2 KiB conversation.
            declare -F post_request >/dev/null || . benches/load_post.sh
            path=$POST_PATH script=(-s "$(post_script post "$(post_request)")")
        fi
        [ -z "${LOAD_CALLGRIND_CLOSE:-}" ] || script+=(-H 'Connection: close')
        # Warm-up first (pools, cache, limiter cells), then only the measured requests count.
        wrk -t1 -c"$LIGHT_CONNS" -d"${warm}s" "${script[@]}" -H "$AUTH" "http://127.0.0.1:$port$path" >/dev/null
        callgrind_control --zero "$vpid" >/dev/null 2>&1 || die "callgrind_control --zero failed for $v"
        local out n
        out=$(wrk -t1 -c"$LIGHT_CONNS" -d"${secs}s" "${script[@]}" -H "$AUTH" "http://127.0.0.1:$port$path")
        callgrind_control --dump "$vpid" >/dev/null 2>&1 || die "callgrind_control --dump failed for $v"
        n=$(printf '%s\n' "$out" | awk '/requests in/ { print $1 }')
        kill -TERM "$vpid" 2>/dev/null || true
        wait "$vpid" 2>/dev/null || true
        local dump total
        dump=$(ls "$dir"/cg.out.* 2>/dev/null | head -n 1)
        [ -n "$dump" ] || die "callgrind wrote no dump for $v"
        total=$(callgrind_annotate "$dump" 2>/dev/null | awk '/PROGRAM TOTALS/ { gsub(/,/, "", $1); print $1 }')
        [ -n "$total" ] && [ "${n:-0}" -gt 0 ] || die "no instruction count or no requests for $v (log: $OUT/keygate-cg-$v.log)"
        cp "$dump" "$OUT/callgrind-$v.out"
        local ipr=$((total / n))
        [ -n "$first_ipr" ] || first_ipr=$ipr
        rows+=("$(printf '%-14s %9d %14d %9d %8.3f' "$v" "$n" "$total" "$ipr" "$(awk -v a="$ipr" -v b="$first_ipr" 'BEGIN { printf "%.3f", a / b }')")")
        port=$((port + 1))
    done
    {
        printf '\ninstructions per request under callgrind (user space, c=%d, %ss after %ss warm-up%s):\n' "$LIGHT_CONNS" "$secs" "$warm" "${LOAD_CALLGRIND_STREAM:+, streamed completions}"
        printf '%-14s %9s %14s %9s %8s\n' variant requests instructions per_req "/first"
        printf '%s\n' "${rows[@]}"
        printf 'profiles: %s/callgrind-<variant>.out (callgrind_annotate --inclusive=yes)\n' "$OUT"
    } | tee "$OUT/callgrind.txt"
}
