#!/usr/bin/env bash
# Runs every check and test: formatting, clippy, unit and integration tests against a
# real PostgreSQL (the harness starts a throwaway cluster, or uses DATABASE_URL).
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/lib.sh
PATH="$(pg_bindir):$PATH"
export PATH
cargo fmt --all -- --check
cargo clippy --all-targets --quiet -- -D warnings
cargo test --all-targets --no-fail-fast
