#!/usr/bin/env bash
# Fuzzes keygate's parsers for a bounded time: the cargo-fuzz targets in fuzz/ (key_parser,
# config_loader, usage_scanner), each run for SECONDS (default 20) from its committed seeds
# in fuzz/seeds/<target>/ plus whatever fuzz/corpus/<target>/ has gathered (gitignored).
# Exits non-zero when any target crashes (panic, failed property, timeout, OOM); the input
# is then in fuzz/artifacts/<target>/ and the panic with its backtrace is printed.
#
#   scripts/fuzz.sh [SECONDS] [TARGET...]
#
# Stable toolchain: this needs no nightly and no RUSTC_BOOTSTRAP. With `--sanitizer none`
# cargo-fuzz passes only stable codegen flags (-Cpasses=sancov-module, -Cllvm-args=
# -sanitizer-coverage-*, --cfg fuzzing, -Cdebug-assertions); the only -Z flags it knows are
# for sanitizers (-Zsanitizer=address, its default) and --build-std/--careful, none used
# here. libFuzzer itself is C++ compiled by libfuzzer-sys's build script, hence the C++
# compiler. Debug assertions and overflow checks are on (cargo-fuzz's default), so integer
# overflow in keygate is a crash too.
#
# --codegen-units 16: the instrumented build covers keygate's whole dependency tree (about
# 7 CPU-minutes from scratch with 16); cargo-fuzz's default of 1 unit makes each crate's
# codegen single-threaded and the build slower. The price is fewer executions per second
# (cargo-fuzz notes up to 3x), which matters less than build time for runs of seconds.
# Same flags on build and run, or cargo rebuilds everything.
set -euo pipefail
cd "$(dirname "$0")/.."
root=$PWD

seconds=${1:-20}
shift || true
targets=("$@")
if [ ${#targets[@]} -eq 0 ]; then
    targets=(key_parser config_loader usage_scanner path_normalizer)
fi
case $seconds in
'' | *[!0-9]*) echo "usage: scripts/fuzz.sh [SECONDS] [TARGET...]" >&2; exit 2 ;;
esac

CARGO_FUZZ_VERSION=0.13.2
FUZZ_FLAGS=(--sanitizer none --codegen-units 16 --fuzz-dir "$root/fuzz")

as_root() {
    if [ "$(id -u)" -eq 0 ]; then "$@"; else sudo "$@"; fi
}

# libfuzzer-sys compiles libFuzzer (C++) with the `cc` crate, which calls `c++`.
if ! command -v c++ >/dev/null 2>&1; then
    echo "fuzz: installing a C++ compiler (g++)"
    as_root env DEBIAN_FRONTEND=noninteractive apt-get update -q
    as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -q g++
fi
if ! cargo fuzz --version >/dev/null 2>&1; then
    echo "fuzz: installing cargo-fuzz $CARGO_FUZZ_VERSION"
    cargo install cargo-fuzz --version "$CARGO_FUZZ_VERSION" --locked
fi

t0=$(date +%s)
# One build (of every target, or of the only one asked for); `cargo fuzz run` below then
# finds it fresh. Same flags in both, or cargo would rebuild.
build_only=()
if [ ${#targets[@]} -eq 1 ]; then build_only=("${targets[0]}"); fi
cargo fuzz build "${FUZZ_FLAGS[@]}" "${build_only[@]}"
echo "fuzz: build took $(( $(date +%s) - t0 ))s"

logs=$(mktemp -d)
trap 'rm -rf "$logs"' EXIT
failed=()
summary=()
export RUST_BACKTRACE=1
for target in "${targets[@]}"; do
    corpus="$root/fuzz/corpus/$target"
    seeds="$root/fuzz/seeds/$target"
    mkdir -p "$corpus" "$root/fuzz/artifacts/$target"
    log="$logs/$target.log"
    echo "fuzz: $target for ${seconds}s"
    status=0
    # New inputs go to the first directory (gitignored); the seeds are only read.
    # -timeout: one input running this long counts as a crash (a hang).
    cargo fuzz run "${FUZZ_FLAGS[@]}" "$target" "$corpus" "$seeds" -- \
        -max_total_time="$seconds" -timeout=30 -print_final_stats=1 >"$log" 2>&1 || status=$?
    execs=$(sed -n 's/^stat::number_of_executed_units: *//p' "$log" | tail -n 1)
    rate=$(sed -n 's/^stat::average_exec_per_sec: *//p' "$log" | tail -n 1)
    cov=$(grep -o 'DONE *cov: [0-9]*' "$log" | grep -o '[0-9]*$' | tail -n 1 || true)
    if [ "$status" -ne 0 ]; then
        failed+=("$target")
        summary+=("$target: FAILED (exit $status) after ${execs:-?} executions")
        echo "fuzz: $target FAILED; its log from the first panic or libFuzzer error:" >&2
        # From the panic (or libFuzzer's error) to cargo-fuzz's own error, which follows.
        awk '/panicked at|ERROR: libFuzzer|==[0-9]+== ERROR|^error(\[|:)/ { on = 1 }
             /^Error: Fuzz target exited/ { print; exit } on' "$log" | head -n 150 >&2
        if ! grep -qE 'panicked at|ERROR: libFuzzer|==[0-9]+== ERROR|^error' "$log"; then tail -n 60 "$log" >&2; fi
        artifact=$(sed -n 's/.*Test unit written to //p' "$log" | tail -n 1)
        if [ -n "$artifact" ] && [ -f "$artifact" ]; then
            echo "fuzz: the input (first 400 bytes, cat -v):" >&2
            head -c 400 "$artifact" | cat -v >&2
            echo >&2
            echo "fuzz: reproduce with: cargo fuzz run ${FUZZ_FLAGS[*]:0:4} $target ${artifact#"$root"/}" >&2
        fi
    else
        summary+=("$target: ok, ${execs:-?} executions (${rate:-?}/s, coverage ${cov:-?}) in ${seconds}s")
    fi
done

echo "fuzz: total $(( $(date +%s) - t0 ))s"
for line in "${summary[@]}"; do echo "fuzz: $line"; done
if [ ${#failed[@]} -ne 0 ]; then
    echo "fuzz: crashes in: ${failed[*]}" >&2
    exit 1
fi
