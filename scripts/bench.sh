#!/usr/bin/env bash
# Runs every xdpvs benchmark and prints one markdown report (needs root).
#
#   scripts/bench.sh
#
# Steps: scripts/setup.sh (idempotent), build the benches, then run `cargo bench --bench
# dataplane`, `--bench e2e` and `--bench control_plane`, each bounded in time. Each bench prints
# its markdown table on stdout; this script gathers them into one report, printed on stdout and
# saved to target/bench-report.md. Progress, cargo output and the benches' logs go to stderr.
# Exits non-zero if setup, a build or any bench fails (the report then says which).
# About 8-10 minutes on a 2-CPU machine (a cold build adds 2-3 minutes); bounded at 15.
set -uo pipefail

cd "$(dirname "$0")/.." || exit 1
ROOT=$(pwd)
BENCHES=(dataplane e2e control_plane)
# Per-bench wall-clock bound in seconds (the benches normally take 1-4 minutes each).
declare -A LIMIT=([dataplane]=240 [e2e]=300 [control_plane]=180)
OUT=$ROOT/target/bench-report.md

log() { echo "bench.sh: $*" >&2; }

if [[ $(id -u) != 0 ]]; then
    log "needs root (network namespaces, XDP)"
    exit 1
fi

# Labs of the e2e and control-plane benches, should one be interrupted (they tear down on
# their own otherwise; a later run also clears them first).
cleanup() {
    "$ROOT/scripts/lab.sh" down xbe >/dev/null 2>&1 || true
    "$ROOT/scripts/lab.sh" down xbcp >/dev/null 2>&1 || true
}
trap cleanup EXIT
trap 'log "interrupted"; exit 130' INT TERM

t_start=$(date +%s)
elapsed() { echo $(($(date +%s) - t_start)); }

log "setup"
if ! "$ROOT/scripts/setup.sh" >&2; then
    log "setup.sh failed"
    exit 1
fi
[[ -d $HOME/.cargo/bin ]] && export PATH="$PATH:$HOME/.cargo/bin"

tmp=$(mktemp -d /tmp/xdpvs-bench.XXXXXX)
trap 'cleanup; rm -rf "$tmp"' EXIT

failed=()
declare -A STATUS
# Build every bench first so that build time is not charged to a bench's time bound.
for b in "${BENCHES[@]}"; do
    log "building bench $b ($(elapsed) s)"
    if ! cargo bench --bench "$b" --no-run >&2; then
        STATUS[$b]="build failed"
        failed+=("$b")
    fi
done

for b in "${BENCHES[@]}"; do
    [[ -n ${STATUS[$b]:-} ]] && continue
    log "running bench $b (bound ${LIMIT[$b]} s; $(elapsed) s so far)"
    t0=$(date +%s)
    timeout -k 10 "${LIMIT[$b]}" cargo bench --bench "$b" >"$tmp/$b.md" 2> >(tee "$tmp/$b.err" >&2)
    rc=$?
    wait  # the tee of stderr
    dt=$(($(date +%s) - t0))
    if ((rc == 0)); then
        STATUS[$b]="ok, ${dt} s"
    elif ((rc == 124 || rc == 137)); then
        STATUS[$b]="timed out after ${LIMIT[$b]} s"
        failed+=("$b")
    else
        STATUS[$b]="failed (exit $rc) after ${dt} s"
        failed+=("$b")
    fi
    log "bench $b: ${STATUS[$b]}"
done

{
    echo "# xdpvs benchmarks"
    echo
    echo "$(date -u +%Y-%m-%dT%H:%M:%SZ); commit $(git rev-parse --short HEAD 2>/dev/null || echo '?')$(git diff --quiet HEAD 2>/dev/null || echo ' (+ local changes)');" \
        "kernel $(uname -r); $(nproc) CPUs ($(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | sed 's/^ *//'));" \
        "total $(elapsed) s. Figures are only comparable within one run (see benches/README.md)."
    echo
    for b in "${BENCHES[@]}"; do
        if [[ ${STATUS[$b]} == ok* ]]; then
            cat "$tmp/$b.md"
            echo
        else
            echo "## $b"
            echo
            echo "**${STATUS[$b]}**"
            if [[ -s $tmp/$b.err ]]; then
                echo
                echo '```'
                tail -n 15 "$tmp/$b.err"
                echo '```'
            fi
            echo
        fi
    done
    echo "Benches: $(for b in "${BENCHES[@]}"; do printf '%s %s; ' "$b" "${STATUS[$b]}"; done)"
} >"$tmp/report.md"

mkdir -p "$(dirname "$OUT")"
cp "$tmp/report.md" "$OUT"
cat "$tmp/report.md"
log "report saved to $OUT ($(elapsed) s)"

if ((${#failed[@]})); then
    log "FAILED: ${failed[*]}"
    exit 1
fi
exit 0
