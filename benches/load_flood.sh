# Sourced by load.sh for LOAD_FLOOD_ROUNDS (default 3; 0 skips): the brief's flood target.
# "Under a flood of random invalid keys, valid keys' p99 stays within 2x of normal and the
# database sees a bounded query rate."
#
# One keygate per auth config, started from kg-1key's config on ports of its own:
#   per-address  the defaults: one address presenting invalid keys gets 429 after
#                auth.failed_auth_per_minute (60) of them, without further lookups
#   spread       failed_auth_per_minute = 0: what a flood from many addresses sees, where
#                every random key is a cache miss: looked up (at most
#                auth.max_concurrent_lookups at once, each remembered as unknown) until
#                the second's lookups have found auth.max_unknown_lookups_per_second
#                (1,000) unknown keys, then refused 429 without a lookup until the next
#                second
#   uncapped     spread without that cap (max_unknown_lookups_per_second = 0): every
#                random key is a database lookup, as before the cap existed
#   preload      spread, with auth.preload = true: no key is looked up on the request path
# Against each, interleaved rounds of three states, with the valid key always at
# LIGHT_CONNS connections (wrk --latency, LIGHT_DURATION seconds):
#   quiet  the valid key alone
#   busy   beside a second wrk sending the same valid key at LOAD_FLOOD_CONNS: the control,
#          an equal amount of legitimate traffic on the same two cores
#   flood  beside a second wrk at LOAD_FLOOD_CONNS sending well-formed random keys, a new
#          one per request
# Both loads are closed-loop, so the flood takes whatever CPU keygate gives it. Printed per
# config and state (medians): the valid key's RPS, p50 and p99, p99 against quiet and
# against busy, the second load's RPS and non-2xx share, key lookups per second (keygate's
# own count, from /readyz) and PostgreSQL's CPU per second.
#
# Uses from load.sh: WORK OUT BASE PATH_Q KEYS_PATH AUTH LIGHT_CONNS LIGHT_DURATION PIDS
# BIN_OF ENV_OF wait_http pg_ticks TICK log die.

FLOOD_CONFIGS=${LOAD_FLOOD_CONFIGS:-per-address spread uncapped preload}

flood_auth() { # config -> the [auth] section it appends
    case $1 in
        per-address) printf '[auth]\n' ;;
        spread) printf '[auth]\nfailed_auth_per_minute = 0\n' ;;
        uncapped) printf '[auth]\nfailed_auth_per_minute = 0\nmax_unknown_lookups_per_second = 0\n' ;;
        preload) printf '[auth]\nfailed_auth_per_minute = 0\npreload = true\n' ;;
        *) die "LOAD_FLOOD_CONFIGS: unknown config $1 (per-address, spread, uncapped, preload)" ;;
    esac
}

lookups() { # port -> keygate's key lookups so far
    local n
    n=$(curl -fsS "http://127.0.0.1:$1/readyz" 2>/dev/null | sed -n 's/.*"lookups":\([0-9]*\).*/\1/p')
    # A failed read must not pass for "no lookups", which is what the table claims.
    [ -n "$n" ] || die "could not read the lookup count from /readyz on port $1"
    echo "$n"
}

flood_round() { # config port state round
    local cfg=$1 port=$2 state=$3 r=$4 d=$LIGHT_DURATION bg_pid="" l0 l1 g0 g1 out bg="" t0 t1
    local url="http://127.0.0.1:$port$PATH_Q"
    # Lookups on lines of their own: set -e sees only the last substitution of a line.
    l0=$(lookups "$port")
    g0=$(pg_ticks) t0=$(date +%s.%N)
    case $state in
        busy) wrk -t1 -c"$FLOOD_CONNS" -d"$((d + 1))s" -H "$AUTH" "$url" >"$WORK/flood-bg.txt" &
            bg_pid=$! ;;
        flood) wrk -t1 -c"$FLOOD_CONNS" -d"$((d + 1))s" -s "$WORK/flood.lua" "$url" >"$WORK/flood-bg.txt" &
            bg_pid=$! ;;
    esac
    # The second load is running before the measured one starts, and after it ends.
    [ -z "$bg_pid" ] || sleep 0.5
    out=$(timeout $((d + 30)) wrk -t1 -c"$LIGHT_CONNS" -d"${d}s" --latency -H "$AUTH" "$url")
    if [ -n "$bg_pid" ]; then
        wait "$bg_pid" || true
        bg=$(cat "$WORK/flood-bg.txt")
    fi
    t1=$(date +%s.%N) g1=$(pg_ticks)
    l1=$(lookups "$port")
    printf '%s\n%s\n' "$out" "$bg" >>"$OUT/wrk-flood.log"
    {
        printf '%s\n' "$out" | sed 's/^/V /'
        printf '%s\n' "$bg" | sed 's/^/B /'
    } | awk -v cfg="$cfg" -v st="$state" -v r="$r" -v dl=$((l1 - l0)) -v dg=$((g1 - g0)) \
        -v secs="$(awk -v a="$t0" -v b="$t1" 'BEGIN { print b - a }')" -v tick="$TICK" '
        function us(x) { if (x ~ /us$/) return x + 0; if (x ~ /ms$/) return x * 1000; if (x ~ /s$/) return x * 1e6; return x + 0 }
        $1 == "V" && / 50% / { p50 = us($3) } $1 == "V" && / 99% / { p99 = us($3) }
        $1 == "V" && /Requests\/sec/ { rps = $3 } $1 == "V" && /Non-2xx/ { verr += $NF }
        $1 == "B" && /Requests\/sec/ { brps = $3 } $1 == "B" && /requests in/ { bn = $2 }
        $1 == "B" && /Non-2xx/ { bbad += $NF }
        END {
            printf "%s\t%s\t%d\t%.0f\t%.0f\t%.0f\t%d\t%.0f\t%.1f\t%.1f\t%.1f\n", cfg, st, r, rps, p50, p99, verr,
                brps, (bn > 0 ? 100 * bbad / bn : 0), dl / secs, dg * 1000 / tick / secs
        }' | tee -a "$OUT/flood.tsv" >&2
}

flood_pass() {
    FLOOD_CONNS=${LOAD_FLOOD_CONNS:-$LIGHT_CONNS}
    local rounds=$1 port=$((BASE + 40)) cfg r i states=(quiet busy flood)
    cat >"$WORK/flood.lua" <<'LUA'
-- A key-guessing flood: a well-formed key (prefix, 43 URL-safe base64 characters, the
-- last one canonical) that nobody holds, new on every request.
local alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"
local path = os.getenv("KEYS_PATH")
local chars = {}
function init(args)
    math.randomseed(os.time())
end
function request()
    for i = 1, 42 do
        local n = math.random(64)
        chars[i] = alphabet:sub(n, n)
    end
    chars[43] = "A"
    return wrk.format("GET", path, { ["Authorization"] = "Bearer pk_test_" .. table.concat(chars) })
end
LUA
    printf 'config\tstate\tround\trps\tp50_us\tp99_us\terrors\tother_rps\tother_non2xx_pct\tlookups_per_s\tdb_cpu_ms_per_s\n' >"$OUT/flood.tsv"
    log ""
    log "random-key flood: valid key at c=$LIGHT_CONNS beside a second load at c=$FLOOD_CONNS, $rounds x ${LIGHT_DURATION}s per state"
    for cfg in $FLOOD_CONFIGS; do
        if (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null; then die "port $port is in use (set LOAD_PORT_BASE)"; fi
        local name=flood-$cfg
        mkdir -p "$WORK/$name"
        { sed -e "s|^listen = .*|listen = \"127.0.0.1:$port\"|" \
            -e "s|^spool_dir = .*|spool_dir = \"$WORK/$name/spool\"|" "$WORK/kg-1key/keygate.toml"
          flood_auth "$cfg"; } >"$WORK/$name/keygate.toml"
        # shellcheck disable=SC2086
        env ${ENV_OF[kg-1key]:-} "${BIN_OF[kg-1key]}" serve --config "$WORK/$name/keygate.toml" \
            2>>"$WORK/keygate-$name.log" &
        local kpid=$!
        PIDS+=("$kpid")
        wait_http "http://127.0.0.1:$port$PATH_Q" "$AUTH"
        wrk -t1 -c"$LIGHT_CONNS" -d2s -H "$AUTH" "http://127.0.0.1:$port$PATH_Q" >/dev/null
        for r in $(seq 1 "$rounds"); do
            for i in 0 1 2; do flood_round "$cfg" "$port" "${states[$(((i + r - 1) % 3))]}" "$r"; done
        done
        kill -TERM "$kpid" 2>/dev/null || true
        wait "$kpid" 2>/dev/null || true
        port=$((port + 1))
    done
    awk -F'\t' '
        function median(list,   a, n, i, j, t) {
            n = split(list, a, " ")
            for (i = 2; i <= n; i++) { t = a[i]; for (j = i - 1; j >= 1 && a[j] + 0 > t + 0; j--) a[j + 1] = a[j]; a[j + 1] = t }
            return n % 2 ? a[(n + 1) / 2] : (a[n / 2] + a[n / 2 + 1]) / 2
        }
        NR == 1 { next }
        {
            k = $1 SUBSEP $2
            if (!(k in seen)) { seen[k] = 1; order[++nk] = k }
            rps[k] = rps[k] " " $4; p50[k] = p50[k] " " $5; p99[k] = p99[k] " " $6; err[k] += $7
            orps[k] = orps[k] " " $8; obad[k] = obad[k] " " $9; lk[k] = lk[k] " " $10; db[k] = db[k] " " $11
        }
        END {
            for (i = 1; i <= nk; i++) { k = order[i]; P99[k] = median(p99[k]) }
            printf "\nrandom-key flood (valid key beside a second load; medians):\n"
            printf "%-12s %-6s %9s %8s %8s %9s %8s %9s %10s %10s %11s %6s\n", "config", "state", "valid_RPS", "p50_us", "p99_us",
                "p99/quiet", "p99/busy", "other_RPS", "other_bad%", "lookups/s", "db_cpu_ms/s", "errors"
            for (i = 1; i <= nk; i++) {
                k = order[i]; split(k, kc, SUBSEP); q = kc[1] SUBSEP "quiet"; b = kc[1] SUBSEP "busy"
                printf "%-12s %-6s %9.0f %8.0f %8.0f %9s %8s %9.0f %10.1f %10.1f %11.1f %6d\n", kc[1], kc[2], median(rps[k]),
                    median(p50[k]), P99[k], (q in P99 && P99[q] > 0) ? sprintf("%.2f", P99[k] / P99[q]) : "-",
                    (b in P99 && P99[b] > 0) ? sprintf("%.2f", P99[k] / P99[b]) : "-", median(orps[k]), median(obad[k]),
                    median(lk[k]), median(db[k]), err[k]
            }
        }' "$OUT/flood.tsv" | tee "$OUT/flood.txt"
}
