#!/usr/bin/env bash
# A keep-alive HTTP client for the demo (scripts/demo.sh step 5), run in the client namespace:
#
#   held.sh ADDR N
#
# Opens N connections to ADDR:80 (bash's /dev/tcp) and keeps them open, asking each for "/"
# every 200 ms; prints one line per answer: "<unix ms> <connection> <body>", or FAIL in place
# of the body when the answer did not come within 2 s. Runs until killed.
set -u
addr=$1 n=$2
declare -a fds
for i in $(seq "$n"); do
    exec {fd}<>"/dev/tcp/$addr/80" || exit 1
    fds[i]=$fd
done

ask() {  # ask I: one request on connection I; prints its body or FAIL
    local fd=${fds[$1]} line len=0 body
    printf 'GET / HTTP/1.1\r\nHost: vip\r\n\r\n' >&"$fd" 2>/dev/null || { echo FAIL; return; }
    while IFS= read -r -t 2 line <&"$fd"; do
        line=${line%$'\r'}
        [[ $line == [Cc]ontent-[Ll]ength:* ]] && len=${line##*: }
        [[ -z $line ]] && break
    done
    if ((len > 0)) && IFS= read -r -t 2 -N "$len" body <&"$fd"; then
        echo "${body%$'\n'}"
    else
        echo FAIL
    fi
}

while :; do
    for i in $(seq "$n"); do
        echo "$(date +%s%3N) $i $(ask "$i")"
    done
    sleep 0.2
done
