#!/usr/bin/env bash
# The xdpvs lab demo (README command one):
#
#   sudo scripts/demo.sh
#
# Installs what is missing (scripts/setup.sh), builds xdpvs, builds a network-namespace lab
# (scripts/lab.sh: a client, two directors, three nginx reals, one L2 segment, LVS-DR), runs
# `xdpvs run` in each director's namespace (a VRRP pair, priorities 150 and 100, with
# connection-state sync) with weights 1:2:3 and HTTP health checks every 200 ms, and then,
# from the client:
#   1. sends 300 requests, each on a new connection, and shows how they were spread;
#   2. stops nginx on real 2 while traffic flows: it leaves rotation, no request reaches it;
#   3. starts nginx again: it comes back and takes traffic again;
#   4. kills the master's daemon (kill -9) and starts it again: the pinned dataplane carries on;
#   5. cuts the master director's link while 20 keep-alive connections are held and new ones
#      flow: the backup takes over, the held connections continue, the master comes back.
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
CFG2=$WORK/xdpvs-dir2.toml     # the backup director
LOG2=$WORK/xdpvs-dir2.log
SOCK2=$WORK/admin-dir2.sock
KEY=$WORK/sync.key
HELD=$WORK/held.log
TRAFFIC=$WORK/traffic.log
BIN=$ROOT/target/debug/xdpvs

DAEMON_PID=""
DAEMON2_PID=""
LOAD_PID=""
HELD_PID=""
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
    if [[ -n $HELD_PID ]]; then
        kill "$HELD_PID" 2>/dev/null || true
        wait "$HELD_PID" 2>/dev/null || true
        HELD_PID=""
    fi
}

# stop_pid PID: SIGTERM, up to 5 s, then SIGKILL.
stop_pid() {
    local pid=$1
    [[ -n $pid ]] || return 0
    if kill -0 "$pid" 2>/dev/null; then
        kill -TERM "$pid" 2>/dev/null || true
        for _ in $(seq 50); do
            kill -0 "$pid" 2>/dev/null || break
            sleep 0.1
        done
        if kill -0 "$pid" 2>/dev/null; then
            problem "xdpvs (pid $pid) did not exit within 5 s of SIGTERM; killed"
            kill -KILL "$pid" 2>/dev/null || true
        fi
    fi
    wait "$pid" 2>/dev/null || true
}

stop_daemon() {
    stop_pid "$DAEMON_PID"
    DAEMON_PID=""
    stop_pid "$DAEMON2_PID"
    DAEMON2_PID=""
}

teardown() {
    local rc=$? left
    trap - EXIT INT TERM
    set +e
    h1 "Teardown"
    stop_load
    stop_daemon
    scripts/lab.sh down "$P"
    left=$(ip netns list 2>/dev/null | awk '{print $1}' | grep -E "^${P}(sw|client|dir|dir2|r[0-9]+)$")
    [[ -z $left ]] || { problem "namespaces left behind: $(echo $left)"; rc=1; }
    left=$(ip -o link show 2>/dev/null | grep -E ': (p-client|p-dir|p-dir2|p-r[0-9]+|d0)[@:]')
    [[ -z $left ]] || { problem "veth left in the root namespace: $left"; rc=1; }
    left=$(pgrep -f "/tmp/${P}lab/|$CFG" 2>/dev/null)
    [[ -z $left ]] || { problem "processes left behind: $(echo $left)"; rc=1; }
    [[ -n $left ]] || say "no namespace, veth or process left (lab $P is gone)"
    say "daemon logs: $LOG (director A), $LOG2 (director B)"
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
xdpvs_list2() { ip netns exec "${P}dir2" "$BIN" list --socket "$SOCK2" "$@"; }

# launch NS CFG LOG SOCK: starts a daemon in director namespace NS and waits until it answers
# (its pid in LAUNCHED). nsenter (not `ip netns exec`, which makes a private mount namespace):
# the daemon then pins its dataplane in the host's bpffs, where the next daemon finds it.
launch() {
    local ns=$1 cfg=$2 log=$3 sock=$4 pid
    RUST_LOG=info nsenter --net="/run/netns/$ns" "$BIN" run --config "$cfg" </dev/null >>"$log" 2>&1 &
    pid=$!
    LAUNCHED=$pid
    for _ in $(seq 100); do
        kill -0 "$pid" 2>/dev/null || { cat "$log" >&2; LAUNCHED=""; die "xdpvs in $ns exited at start-up"; }
        [[ -S $sock ]] && ip netns exec "$ns" "$BIN" list --socket "$sock" >/dev/null 2>&1 && return 0
        sleep 0.1
    done
    cat "$log" >&2
    die "xdpvs in $ns does not answer on $sock after 10 s"
}

start_daemon() { launch "${P}dir" "$CFG" "$LOG" "$SOCK"; DAEMON_PID=$LAUNCHED; }
start_daemon2() { launch "${P}dir2" "$CFG2" "$LOG2" "$SOCK2"; DAEMON2_PID=$LAUNCHED; }

# vrrp_state LISTFN: MASTER, BACKUP, FAULT... from the VRRP line of `xdpvs list`.
vrrp_state() { "$1" 2>/dev/null | awk '/^VRRP front/ {print $6}'; }

# wait_vrrp LISTFN STATE SECONDS: until that director's instance is in STATE.
wait_vrrp() {
    local end=$(($(now_ms) + $3 * 1000))
    while (($(now_ms) < end)); do
        [[ $(vrrp_state "$1") == "$2" ]] && return 0
        sleep 0.02
    done
    return 1
}

show_list() { xdpvs_list | sed 's/^/   /'; }

# The daemon's log lines about real 2's health transitions (time and message, no colours).
log_transitions() {
    sed 's/\x1b\[[0-9;]*m//g' "$LOG" | grep -F 'xdpvs::daemon' | grep -F 'real=198.18.0.12' \
        | sed -E 's/^[0-9-]+T([0-9:.]{12})[0-9]*Z +[A-Z]+ +xdpvs::daemon: /\1  /; s/^/     /' \
        | tail -n "${1:-1}" || true
}

# wait_health ADDR STATE SECONDS: until `xdpvs list` shows the real in STATE; 0 if it did.
wait_health() {
    local end=$(($(now_ms) + $3 * 1000)) row
    while (($(now_ms) < end)); do
        # Health (column 7) and the weight in force in the dataplane (column 4): down means
        # out of rotation in the packet path, up back in it.
        row=$(xdpvs_list 2>/dev/null | awk -v a="$1" '$1 == "->" && $2 == a {print $7, $4}')
        case "$2 ${row:-}" in
            "down down 0" | "up up "[1-9]*) return 0 ;;
        esac
        sleep 0.02
    done
    return 1
}

# Background traffic from the client: a new connection per request, about 40 per second, one
# line per request: "<unix ms when it started> <body>" (body r1/r2/r3, or FAIL).
start_load() {
    : >"$TRAFFIC"
    ip netns exec "${P}client" bash -c '
        while :; do
            t=$(date +%s%3N)
            b=$(curl -s --max-time 1 "http://'"$VIP"'/") || b=""
            echo "$t ${b:-FAIL}"
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

# gap FROM_MS TO_MS: the longest time without a successful request in [FROM, TO) of the
# background traffic (the client's outage, to a request's spacing).
gap() {
    awk -v a="$1" -v b="$2" '$1 >= a && $1 < b && $2 != "FAIL" {if (last) {d = $1 - last; if (d > m) m = d}; last = $1}
        END {print m + 0}' "$TRAFFIC"
}

# Background keep-alive client: N connections held open from the client (bash /dev/tcp), each
# asked for "/" every 200 ms; one line per answer: "<unix ms> <connection> <body>" (or FAIL).
start_held() {
    : >"$HELD"
    ip netns exec "${P}client" bash "$ROOT/scripts/held.sh" "$VIP" "$1" >"$HELD" 2>/dev/null &
    HELD_PID=$!
}

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
scripts/lab.sh up "$P" 3 1500 driver 2 | sed 's/^/   /'
cat <<EOF
   ${P}client  198.18.0.1   ---+
   ${P}dir     198.18.0.2   ---+-- bridge (${P}sw)   director A, VRRP priority 150 (master)
   ${P}dir2    198.18.0.3   ---+                     director B, VRRP priority 100 (backup);
   ${P}r1..r3  198.18.0.11-13 -+                     the master holds VIP $VIP (answers ARP).
                                                      VIP on lo of each real (arp_ignore=1,
                                                      arp_announce=2): LVS-DR, replies go
                                                      straight back to the client
EOF

mkdir -p "$WORK"
: >"$LOG"   # the daemon appends (a restarted daemon adds to the same log)
: >"$LOG2"
rm -f "$SOCK" "$SOCK2"
# The pair's shared sync key: 32 random bytes as hex, readable by root only.
(umask 077; od -An -tx1 -N32 /dev/urandom | tr -d ' \n' >"$KEY")
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

[[vrrp]]
name = "front"
interface = "d0"
virtual_router_id = 51
priority = 150
advert_interval = "100ms"
preempt = true
addresses = ["$VIP/32"]
track_services = ["web"]

[sync]
listen = "198.18.0.2:8899"
peer = "198.18.0.3:8899"
key_file = "$KEY"
EOF
# Director B: the same services, priority 100, its own socket, sync the other way.
sed -e "s|^admin_socket = .*|admin_socket = \"$SOCK2\"|" -e 's|^metrics = .*|metrics = "off"|' \
    -e 's|^priority = 150|priority = 100|' -e 's|^listen = "198.18.0.2:8899"|listen = "198.18.0.3:8899"|' \
    -e 's|^peer = "198.18.0.3:8899"|peer = "198.18.0.2:8899"|' "$CFG" >"$CFG2"

h1 "Config ($CFG)"
sed -n '/^\[service.check\]/,/^rise/p' "$CFG" | sed 's/^/   /'
say "reals 198.18.0.11-13:80 with weights 1:2:3"
"$BIN" check --config "$CFG" | sed 's/^/   /'

h1 "Start: nsenter --net=/run/netns/${P}dir xdpvs run --config $CFG (and the same in ${P}dir2)"
start_daemon
start_daemon2
say "xdpvs running in ${P}dir (pid $DAEMON_PID) and ${P}dir2 (pid $DAEMON2_PID), XDP program on d0:"
ip -n "${P}dir" -o link show d0 | grep -o 'prog/xdp[^ ]* id [0-9]*' | sed 's/^/   /' || true
wait_vrrp xdpvs_list MASTER 5 || die "director A did not become VRRP master"
wait_vrrp xdpvs_list2 BACKUP 5 || die "director B is not VRRP backup"
say "VRRP: $(xdpvs_list | grep '^VRRP')"
say "      $(xdpvs_list2 | grep '^VRRP')"
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
wait_vrrp xdpvs_list MASTER 5 || problem "director A did not take the VIP back after its restart"

# ------------------------------------------------------ 5. the master director's link is cut

h1 "5. Cut director A's link while 20 keep-alive connections are held and new ones flow"
start_held 20
start_load
sleep 2
say "20 held connections, on reals: $(awk '!($2 in seen) {seen[$2] = 1; n[$3]++} END {for (r in n) printf "%s %d  ", r, n[r]}' "$HELD")"
t_cut=$(now_ms)
ip -n "${P}sw" link set p-dir down
say "A's switch port is down"
if wait_vrrp xdpvs_list2 MASTER 5; then
    t_b=$(now_ms)
    say "director B is VRRP master $((t_b - t_cut)) ms later (Master_Down_Interval: 3 x 100 ms + skew 61 ms)"
else
    t_b=$(now_ms)
    problem "director B did not take over within 5 s"
fi
sleep 2
h1 "xdpvs list on director B (the held connections are there, synced, with their ActiveConn)"
xdpvs_list2 | sed 's/^/   /'
t_up=$(now_ms)
ip -n "${P}sw" link set p-dir up
say "A's switch port is up again"
if wait_vrrp xdpvs_list MASTER 5 && wait_vrrp xdpvs_list2 BACKUP 2; then
    t_a=$(now_ms)
    say "director A is master again $((t_a - t_up)) ms later (it rejoins as backup, then preempts with priority 150)"
else
    t_a=$(now_ms)
    problem "director A did not take over again within 5 s"
fi
sleep 2
t_end=$(now_ms)
stop_load
say "new connections, from the cut to B's takeover:   $(split "$t_cut" "$t_b")"
say "new connections, while B was master:             $(split "$t_b" "$t_up")"
say "new connections, after A came back:              $(split "$t_a" "$t_end")"
out=$(gap "$t_cut" "$t_end")
say "the client's longest time without a new connection: $out ms"
((out < 1000)) || problem "new connections failed for $out ms around the failover"
n=$(count "$t_b" "$t_end" FAIL)
((n == 0)) || problem "$n new connections failed after B took over"
held_total=$(awk -v a="$t_cut" '$1 >= a' "$HELD" | wc -l)
held_failed=$(awk -v a="$t_cut" '$1 >= a && $3 == "FAIL"' "$HELD" | wc -l)
moved=$(awk '{if ($2 in r && r[$2] != $3 && $3 != "FAIL") m++; if ($3 != "FAIL") r[$2] = $3} END {print m + 0}' "$HELD")
say "held connections from the cut on: $held_total answers, $held_failed failed, $moved moved to another real"
say "(B's wlc sends new connections to the real with the lowest (256 x ActiveConn + InActConn) / weight,"
say " counting the held connections and the closing ones it holds as copies)"
((held_failed == 0)) || problem "$held_failed answers on held connections failed across the failover"
((moved == 0)) || problem "$moved held connections changed real"
((held_total > 0)) || problem "the held connections gave no answer"
