#!/usr/bin/env bash
# The xdpvs lab demo (README command one):
#
#   sudo scripts/demo.sh
#
# Installs what is missing (scripts/setup.sh), builds xdpvs, builds a network-namespace lab
# (scripts/lab.sh: a client, the director, three nginx reals, one L2 segment, LVS-DR), runs
# `xdpvs run` in the director's namespace with weights 1:2:3 and HTTP health checks every 200 ms,
# and then, from the client:
#   1. sends 300 requests, each on a new connection, and shows how they were spread;
#   2. stops nginx on real 2 while traffic flows: it leaves rotation, no request reaches it;
#   3. starts nginx again: it comes back and takes traffic again.
# Everything is torn down at the end, also on an error or Ctrl-C. Exits non-zero if the director
# did not balance or the health checks did not take real 2 out and back: it doubles as a smoke test.
#
# Environment: XDPVS_DEMO_PREFIX (lab namespace prefix, default "demo"),
#              XDPVS_SKIP_SETUP=1 (do not run scripts/setup.sh).
set -euo pipefail

cd "$(dirname "$0")/.."
ROOT=$PWD
P=${XDPVS_DEMO_PREFIX:-demo}
VIP=198.18.0.100
R2=198.18.0.12:80
NREQ=300
WORK=/tmp/xdpvs-$P            # config, daemon log, traffic log (kept after the demo)
CFG=$WORK/xdpvs.toml
LOG=$WORK/xdpvs.log
SOCK=$WORK/admin.sock
TRAFFIC=$WORK/traffic.log
BIN=$ROOT/target/debug/xdpvs

DAEMON_PID=""
LOAD_PID=""
problems=()

if [[ -t 1 ]]; then
    h1() { printf '\n\033[1m== %s\033[0m\n' "$*"; }
else
    h1() { printf '\n== %s\n' "$*"; }
fi
say() { echo "   $*"; }
problem() { problems+=("$*"); echo "!! $*" >&2; }
die() { echo "demo: $*" >&2; exit 1; }
now_ms() { date +%s%3N; }

[[ $(id -u) == 0 ]] || die "needs root (XDP and network namespaces): sudo scripts/demo.sh"
for d in "${CARGO_HOME:-$HOME/.cargo}/bin" /root/.cargo/bin; do
    [[ -d $d && ":$PATH:" != *":$d:"* ]] && PATH="$d:$PATH"
done
export PATH

# ----------------------------------------------------------------------------------- teardown

stop_load() {
    if [[ -n $LOAD_PID ]]; then
        kill "$LOAD_PID" 2>/dev/null || true
        wait "$LOAD_PID" 2>/dev/null || true
        LOAD_PID=""
    fi
}

stop_daemon() {
    [[ -n $DAEMON_PID ]] || return 0
    if kill -0 "$DAEMON_PID" 2>/dev/null; then
        kill -TERM "$DAEMON_PID" 2>/dev/null || true
        for _ in $(seq 50); do
            kill -0 "$DAEMON_PID" 2>/dev/null || break
            sleep 0.1
        done
        if kill -0 "$DAEMON_PID" 2>/dev/null; then
            problem "xdpvs did not exit within 5 s of SIGTERM; killed"
            kill -KILL "$DAEMON_PID" 2>/dev/null || true
        fi
    fi
    wait "$DAEMON_PID" 2>/dev/null || true
    DAEMON_PID=""
}

teardown() {
    local rc=$? left
    trap - EXIT INT TERM
    set +e
    h1 "Teardown"
    stop_load
    stop_daemon
    scripts/lab.sh down "$P"
    left=$(ip netns list 2>/dev/null | awk '{print $1}' | grep -E "^${P}(sw|client|dir|r[0-9]+)$")
    [[ -z $left ]] || { problem "namespaces left behind: $(echo $left)"; rc=1; }
    left=$(ip -o link show 2>/dev/null | grep -E ': (p-client|p-dir|p-r[0-9]+|d0)[@:]')
    [[ -z $left ]] || { problem "veth left in the root namespace: $left"; rc=1; }
    left=$(pgrep -f "/tmp/${P}lab/|$CFG" 2>/dev/null)
    [[ -z $left ]] || { problem "processes left behind: $(echo $left)"; rc=1; }
    [[ -n $left ]] || say "no namespace, veth or process left (lab $P is gone)"
    say "daemon log: $LOG"
    if ((rc == 0 && ${#problems[@]} == 0)); then
        h1 "Demo OK"
    else
        h1 "Demo FAILED"
        for p in "${problems[@]}"; do echo "   - $p"; done
        ((rc)) || rc=1
    fi
    exit "$rc"
}
trap teardown EXIT
trap 'echo; problem "interrupted"; exit 130' INT TERM

# ------------------------------------------------------------------------------------ helpers

xdpvs_list() { ip netns exec "${P}dir" "$BIN" list --socket "$SOCK" "$@"; }

# Starts the daemon in the director's namespace and waits until it answers. nsenter (not
# `ip netns exec`, which makes a private mount namespace): the daemon then pins its dataplane
# in the host's bpffs, where the next daemon finds it.
start_daemon() {
    RUST_LOG=info nsenter --net="/run/netns/${P}dir" "$BIN" run --config "$CFG" </dev/null >>"$LOG" 2>&1 &
    DAEMON_PID=$!
    for _ in $(seq 100); do
        kill -0 "$DAEMON_PID" 2>/dev/null || { cat "$LOG" >&2; DAEMON_PID=""; die "xdpvs exited at start-up"; }
        [[ -S $SOCK ]] && xdpvs_list >/dev/null 2>&1 && break
        sleep 0.1
    done
    xdpvs_list >/dev/null || { cat "$LOG" >&2; die "xdpvs does not answer on $SOCK after 10 s"; }
}

# Column of real $1 in `xdpvs list`: weight (4), health (7).
real_col() { xdpvs_list 2>/dev/null | awk -v a="$1" -v c="$2" '$1 == "->" && $2 == a {print $c}'; }

show_list() { xdpvs_list | sed 's/^/   /'; }

# The daemon's log lines about real 2's health transitions (time and message, no colours).
log_transitions() {
    sed 's/\x1b\[[0-9;]*m//g' "$LOG" | grep -F 'xdpvs::daemon' | grep -F 'real=198.18.0.12' \
        | sed -E 's/^[0-9-]+T([0-9:.]{12})[0-9]*Z +[A-Z]+ +xdpvs::daemon: /\1  /; s/^/     /' \
        | tail -n "${1:-1}" || true
}

# wait_health ADDR STATE SECONDS: until `xdpvs list` shows the real in STATE; 0 if it did.
wait_health() {
    local end=$(($(now_ms) + $3 * 1000))
    while (($(now_ms) < end)); do
        [[ $(real_col "$1" 7) == "$2" ]] && return 0
        sleep 0.02
    done
    return 1
}

# Background traffic from the client: a new connection per request, about 40 per second, one
# line per request: "<unix ms> <body>" (body r1/r2/r3, or FAIL).
start_load() {
    : >"$TRAFFIC"
    ip netns exec "${P}client" bash -c '
        while :; do
            b=$(curl -s --max-time 1 "http://'"$VIP"'/") || b=""
            echo "$(date +%s%3N) ${b:-FAIL}"
            sleep 0.02
        done' >"$TRAFFIC" 2>/dev/null &
    LOAD_PID=$!
}

# split FROM_MS TO_MS: counts of the background traffic in [FROM, TO).
split() {
    awk -v a="$1" -v b="$2" '$1 >= a && $1 < b {n[$2]++; t++}
        END {printf "%4d requests: r1 %3d   r2 %3d   r3 %3d   failed %3d\n",
             t, n["r1"], n["r2"], n["r3"], n["FAIL"]}' "$TRAFFIC"
}
count() { awk -v a="$1" -v b="$2" -v w="$3" '$1 >= a && $1 < b && $2 == w {n++} END {print n + 0}' "$TRAFFIC"; }

# ------------------------------------------------------------------------------------- set-up

h1 "Setup (scripts/setup.sh: installs what is missing)"
if [[ ${XDPVS_SKIP_SETUP:-0} != 1 ]]; then
    scripts/setup.sh
fi

h1 "Build (cargo build; the first build also compiles the XDP program, a few minutes)"
t0=$SECONDS
cargo build --bin xdpvs
say "built $BIN in $((SECONDS - t0)) s"

h1 "Lab: client, director and 3 nginx reals in network namespaces (prefix $P)"
scripts/lab.sh up "$P" 3 | sed 's/^/   /'
cat <<EOF
   ${P}client  198.18.0.1   ---+
   ${P}dir     198.18.0.2   ---+-- bridge (${P}sw)   VIP $VIP:80 on the director (answers ARP)
   ${P}r1..r3  198.18.0.11-13 -+                     VIP on lo of each real (arp_ignore=1,
                                                      arp_announce=2): LVS-DR, replies go
                                                      straight back to the client
EOF

mkdir -p "$WORK"
: >"$LOG"   # the daemon appends (a restarted daemon adds to the same log)
rm -f "$SOCK"
cat >"$CFG" <<EOF
# Written by scripts/demo.sh: config/lab.toml with a fast HTTP health check.
[director]
interface = "d0"
metrics = "127.0.0.1:9469"
admin_socket = "$SOCK"

[[service]]
name = "web"
address = "$VIP:80"
protocol = "tcp"
scheduler = "wlc"
forwarding = "dr"
on_failure = "quiesce"

[service.check]
type = "http"
path = "/health"
interval = "200ms"
timeout = "500ms"
fall = 2
rise = 2

[[service.real]]
address = "198.18.0.11:80"
weight = 1

[[service.real]]
address = "198.18.0.12:80"
weight = 2

[[service.real]]
address = "198.18.0.13:80"
weight = 3
EOF

h1 "Config ($CFG)"
sed -n '/^\[service.check\]/,/^rise/p' "$CFG" | sed 's/^/   /'
say "reals 198.18.0.11-13:80 with weights 1:2:3"
"$BIN" check --config "$CFG" | sed 's/^/   /'

h1 "Start: nsenter --net=/run/netns/${P}dir xdpvs run --config $CFG"
start_daemon
say "xdpvs running (pid $DAEMON_PID), XDP program on d0:"
ip -n "${P}dir" -o link show d0 | grep -o 'prog/xdp[^ ]* id [0-9]*' | sed 's/^/   /' || true
# Health checks start with every real up; give them a moment to report.
sleep 0.5

# --------------------------------------------------------------------------- 1. distribution

h1 "1. $NREQ requests from the client, each on a new connection (curl, Connection: close)"
out=$(ip netns exec "${P}client" curl -s --max-time 2 -H 'Connection: close' \
    -w 'code=%{http_code}\n' "http://$VIP/?n=[1-$NREQ]" || true)
declare -A got
for r in r1 r2 r3; do got[$r]=$(grep -c "^$r\$" <<<"$out" || true); done
fails=$(grep -c '^code=000$' <<<"$out" || true)
printf '   %-6s %-7s %8s %8s %10s\n' real weight requests share expected
w=1
for r in r1 r2 r3; do
    share=$(awk -v n="${got[$r]}" -v t="$NREQ" 'BEGIN {printf "%.1f%%", 100 * n / t}')
    want=$(awk -v w="$w" 'BEGIN {printf "%d/6 = %.1f%%", w, 100 * w / 6}')
    printf '   %-6s %-7s %8s %8s %14s\n' "$r" "$w" "${got[$r]}" "$share" "$want"
    if ((got[$r] == 0)); then
        problem "$r got no request: the director did not balance"
    elif awk -v n="${got[$r]}" -v t="$NREQ" -v w="$w" \
        'BEGIN {d = n / t - w / 6; exit !(d > 0.10 || d < -0.10)}'; then
        problem "$r got ${got[$r]} of $NREQ requests, more than 10 points off $w/6"
    fi
    w=$((w + 1))
done
say "failed requests: $fails"
((fails == 0)) || problem "$fails of $NREQ requests failed with every real up"

h1 "xdpvs list"
show_list

# ------------------------------------------------------------------------- 2. a real goes down

h1 "2. Stop nginx on real 2 while traffic flows (about 40 new connections/s from the client)"
start_load
sleep 2
t_stop=$(now_ms)
scripts/lab.sh nginx-stop "$P" 2
say "nginx on r2 stopped"
if wait_health "$R2" down 5; then
    t_down=$(now_ms)
    say "r2 is down in xdpvs $((t_down - t_stop)) ms later (check: every 200 ms, fall = 2, timeout 500 ms)"
else
    t_down=$(now_ms)
    problem "r2 was not marked down within 5 s of stopping nginx"
fi
sleep 3
t_after=$(now_ms)
h1 "xdpvs list (r2 out of rotation: weight 0, health down, its last failure)"
show_list
say "daemon log:"
log_transitions
echo
say "traffic before the stop:                $(split 0 "$t_stop")"
say "between the stop and r2 marked down:    $(split "$t_stop" "$t_down")"
say "after r2 was marked down:               $(split "$t_down" "$t_after")"
n=$(count "$t_down" "$t_after" r2)
((n == 0)) || problem "r2 got $n requests after it was marked down"
n=$(count "$t_down" "$t_after" FAIL)
((n == 0)) || problem "$n requests failed after r2 was marked down"
n=$(count "$t_down" "$t_after" r1)
m=$(count "$t_down" "$t_after" r3)
((n > 0 && m > 0)) || problem "r1 and r3 did not both serve while r2 was down"

# ------------------------------------------------------------------------------ 3. it returns

h1 "3. Start nginx on real 2 again"
t_start=$(now_ms)
scripts/lab.sh nginx-start "$P" 2
say "nginx on r2 answers again"
if wait_health "$R2" up 5; then
    t_up=$(now_ms)
    say "r2 is up in xdpvs $((t_up - t_start)) ms later (rise = 2)"
else
    t_up=$(now_ms)
    problem "r2 did not come back within 5 s of starting nginx"
fi
sleep 3
t_end=$(now_ms)
stop_load
h1 "xdpvs list (r2 back with its configured weight)"
show_list
say "daemon log:"
log_transitions
echo
say "traffic since r2 came back:             $(split "$t_up" "$t_end")"
say "(wlc: r2 missed the connections of its time out, so it takes more until its count catches up)"
n=$(count "$t_up" "$t_end" r2)
((n > 0)) || problem "r2 got no request after it came back"
n=$(count "$t_up" "$t_end" FAIL)
((n == 0)) || problem "$n requests failed after r2 came back"

h1 "Prometheus metrics (curl http://127.0.0.1:9469/metrics in the director's namespace), abridged"
ip netns exec "${P}dir" curl -s --max-time 2 http://127.0.0.1:9469/metrics \
    | grep -E '^xdpvs_(real_connections_total|real_up|real_weight)' | sed 's/^/   /' \
    || say "(no metrics answer)"

# -------------------------------------------------------------- 4. the daemon crashes, restarts

h1 "4. kill -9 the daemon while traffic flows, start it again a second later"
start_load
sleep 1
t_kill=$(now_ms)
kill -KILL "$DAEMON_PID" 2>/dev/null || true
wait "$DAEMON_PID" 2>/dev/null || true
DAEMON_PID=""
say "daemon killed; the pinned XDP program stays: $(ip -n "${P}dir" -o link show d0 | grep -o 'prog/xdp[^ ]* id [0-9]*' || echo 'NONE')"
say "xdpvs list with no daemon (read from the pinned maps):"
nsenter --net="/run/netns/${P}dir" "$BIN" list --config "$CFG" | head -n 3 | sed 's/^/   /'
sleep 1
start_daemon
t_back=$(now_ms)
say "restarted (pid $DAEMON_PID) $((t_back - t_kill)) ms after the kill:"
grep -E 'adopted the pinned|applied to the adopted' "$LOG" | tail -n 2 \
    | sed -E 's/^[0-9-]+T([0-9:.]{12})[0-9]*Z +[A-Z]+ +xdpvs::daemon: /\1  /; s/^/     /'
sleep 2
t_end=$(now_ms)
stop_load
say "traffic from the kill to 2 s after the restart: $(split "$t_kill" "$t_end")"
n=$(count "$t_kill" "$t_end" FAIL)
((n == 0)) || problem "$n requests failed across the daemon's crash and restart"
grep -q 'adopted the pinned dataplane' "$LOG" || problem "the restarted daemon did not adopt the dataplane"
