# Shared by the quick-start scripts: find or install PostgreSQL's server binaries.
# Sourced, not run.

# Prints the directory holding initdb/pg_ctl, installing Debian's postgresql package
# when none is found.
pg_bindir() {
    local d
    if command -v initdb >/dev/null 2>&1; then dirname "$(command -v initdb)"; return; fi
    d=$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -n 1)
    if [ -z "$d" ]; then
        echo "PostgreSQL server not found; installing Debian's postgresql package" >&2
        local sudo=""
        [ "$(id -u)" -ne 0 ] && sudo="sudo"
        $sudo env DEBIAN_FRONTEND=noninteractive apt-get update -q >&2
        $sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y -q postgresql >&2
        d=$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -n 1)
    fi
    [ -n "$d" ] || { echo "could not install PostgreSQL" >&2; exit 1; }
    echo "$d"
}

# Runs a PostgreSQL binary as the postgres user when we are root (it refuses root).
as_pg() {
    if [ "$(id -u)" -eq 0 ]; then runuser -u postgres -- "$@"; else "$@"; fi
}
