#!/usr/bin/env bash
# Runs every check and test: formatting, clippy (which also builds the benches), unit
# and integration tests against a real PostgreSQL (the harness starts throwaway
# clusters, or uses DATABASE_URL). Ends with one "N passed, N failed" line.
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/lib.sh
PATH="$(pg_bindir):$PATH"
export PATH
cargo fmt --all -- --check
cargo clippy --all-targets --quiet -- -D warnings
log=$(mktemp)
trap 'rm -f "$log"' EXIT
status=0
cargo test --lib --bins --tests --no-fail-fast 2>&1 | tee "$log" || status=$?
# Bounded fuzzing of the key parser, config loader, usage scanner and path normalizer (fuzz/README.md).
./scripts/fuzz.sh 15 || status=$?
awk '/^test result:/ { for (i = 1; i <= NF; i++) { if ($(i+1) ~ /^passed/) p += $i; if ($(i+1) ~ /^failed/) f += $i } }
     END { printf "tests: %d passed, %d failed\n", p, f }' "$log"
exit "$status"
