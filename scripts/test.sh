#!/usr/bin/env bash
# Runs every test of xdpvs (README command two; `.ci/run` calls it). Needs root: the dataplane
# tests load XDP programs and the end-to-end tests build network-namespace labs.
#
#   sudo scripts/test.sh
#
# Steps: scripts/setup.sh (idempotent installer), cargo fmt --check, cargo clippy (all targets,
# warnings are errors), cargo test --workspace --all-targets (unit, dataplane through
# BPF_PROG_TEST_RUN, end-to-end in netns labs, tests/deb.rs: the release .deb built by
# scripts/deb.sh and installed into a scratch root), cargo test -p xdpvs-common (the shared map
# types built alone, without the `user` feature, as the XDP program sees them).
# Root-only tests carry `#[ignore = "needs root"]`: a plain `cargo test` without root lists them as
# ignored; this script asks for them with `--include-ignored` (and their guard panics without root).
# Every step runs even if an earlier one failed; a summary follows; the exit status is non-zero
# if any step failed. Full output of each step: target/test-logs/<step>.log.
#
# Environment:
#   XDPVS_TEST_THREADS  test threads per test binary (default 2). The end-to-end tests each build
#                       their own lab (distinct namespace prefixes), so they may run in parallel;
#                       they also time health checks in 200 ms steps, so do not oversubscribe a
#                       small machine.
#   XDPVS_SKIP_SETUP=1  do not run scripts/setup.sh.
set -uo pipefail

cd "$(dirname "$0")/.." || exit 1
ROOT=$PWD

if [[ $(id -u) != 0 ]]; then
    echo "test.sh: needs root (XDP programs and network namespaces): sudo scripts/test.sh" >&2
    exit 1
fi
# cargo from rustup lives in ~/.cargo/bin, which a root shell (sudo, CI) may not have on PATH.
for d in "${CARGO_HOME:-$HOME/.cargo}/bin" /root/.cargo/bin; do
    [[ -d $d && ":$PATH:" != *":$d:"* ]] && PATH="$d:$PATH"
done
export PATH
export CARGO_TERM_COLOR=${CARGO_TERM_COLOR:-never}
# Backtraces of failing tests, and no interactive pager anywhere.
export RUST_BACKTRACE=${RUST_BACKTRACE:-1}
THREADS=${XDPVS_TEST_THREADS:-2}

LOGDIR=$ROOT/target/test-logs
mkdir -p "$LOGDIR"

names=() results=() times=() details=()
failed=0
start_all=$SECONDS

# step NAME CMD...: runs CMD with its output on the terminal and in $LOGDIR/NAME.log.
step() {
    local name=$1 t0=$SECONDS rc log=$LOGDIR/$1.log
    shift
    echo
    echo "=== $name: $*"
    "$@" </dev/null 2>&1 | tee "$log"
    rc=${PIPESTATUS[0]}
    names+=("$name")
    times+=("$((SECONDS - t0))s")
    if ((rc == 0)); then
        results+=("ok")
    else
        results+=("FAILED (exit $rc)")
        failed=1
    fi
    details+=("$(summarize "$log")")
}

# Test counts of a cargo test log: "N passed, M failed, K ignored" over all test binaries.
summarize() {
    local log=$1
    grep -q '^test result:' "$log" || return 0
    awk '/^test result:/ {
            for (i = 1; i <= NF; i++) {
                if ($(i) ~ /^passed;?$/) p += $(i - 1)
                if ($(i) ~ /^failed;?$/) f += $(i - 1)
                if ($(i) ~ /^ignored;?$/) g += $(i - 1)
            }
         }
         END { printf "%d passed, %d failed, %d ignored", p, f, g }' "$log"
}

if [[ ${XDPVS_SKIP_SETUP:-0} != 1 ]]; then
    step setup scripts/setup.sh
fi
step fmt cargo fmt --all --check
step fmt-ebpf cargo fmt --check --manifest-path ebpf/xdpvs-ebpf/Cargo.toml
step clippy cargo clippy --workspace --all-targets -- -D warnings
step test cargo test --workspace --all-targets --no-fail-fast -- --include-ignored --test-threads="$THREADS"
step test-common cargo test -p xdpvs-common

echo
echo "================================ summary ================================"
for i in "${!names[@]}"; do
    printf '  %-12s %-18s %6s  %s\n' "${names[$i]}" "${results[$i]}" "${times[$i]}" "${details[$i]}"
done
# Names of failed tests, from the libtest output.
fails=$(grep -h -E '^test .* \.\.\. FAILED$' "$LOGDIR"/test.log "$LOGDIR"/test-common.log 2>/dev/null \
    | sed -E 's/^test (.*) \.\.\. FAILED$/\1/' | sort -u)
if [[ -n $fails ]]; then
    echo "  failed tests:"
    sed 's/^/    /' <<<"$fails"
fi
# Test binaries that failed (also those that crashed and printed no "test result" line).
awk '/^error: [0-9]+ targets? failed:/ {on = 1; print "  " $0; next}
     on && /^ +`/ {print "  " $0; next}
     {on = 0}
     /^error: test failed, to rerun pass/ {print "  " $0}' \
    "$LOGDIR"/test.log "$LOGDIR"/test-common.log 2>/dev/null
echo "  total time $((SECONDS - start_all))s; logs in $LOGDIR/"
# One plain closing line over every test binary, for CI's reader.
totals=$(cat "$LOGDIR"/test.log "$LOGDIR"/test-common.log 2>/dev/null \
    | awk '/^test result:/ { for (i = 1; i <= NF; i++) {
                if ($(i) ~ /^passed;?$/) p += $(i - 1)
                if ($(i) ~ /^failed;?$/) f += $(i - 1) } }
           END { printf "%d passed, %d failed", p, f }')
if ((failed)); then
    echo "RESULT: FAILED"
    echo "tests: $totals"
    exit 1
fi
echo "RESULT: all tests passed"
echo "tests: $totals"
