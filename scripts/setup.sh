#!/usr/bin/env bash
# Idempotent machine setup for building and testing xdpvs (Debian 12, root).
# Installs the Debian toolchain used for the eBPF crate (see shared/TOOLCHAIN.md),
# the lab's tools, bpf-linker, and cargo-deb with what tests/deb.rs uses to check the package
# (dpkg-dev, man-db, systemd's systemd-analyze). Safe to run repeatedly: it only installs what is missing.
set -euo pipefail

PKGS=(ca-certificates rustc-web cargo-web rust-web-src llvm-22-dev clang-19 bpftool iproute2 ethtool keepalived
      nginx-light wrk haproxy curl procps psmisc nftables prometheus netsniff-ng iperf3
      dnsmasq-base bind9-dnsutils chromium dpkg-dev man-db systemd)

missing=()
for p in "${PKGS[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if ((${#missing[@]})); then
    echo "setup: installing ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
    # The Debian nginx package starts a default server on :80 in the root namespace; the lab
    # runs its own instances inside namespaces, so keep the system one stopped.
    (systemctl disable --now nginx 2>/dev/null || service nginx stop 2>/dev/null || pkill -x nginx) >/dev/null 2>&1 || true
    # Same for keepalived: the VRRP tests run their own instances inside lab namespaces only.
    (systemctl disable --now keepalived 2>/dev/null || service keepalived stop 2>/dev/null) >/dev/null 2>&1 || true
fi

if ! command -v bpf-linker >/dev/null 2>&1 && [ ! -x "$HOME/.cargo/bin/bpf-linker" ]; then
    echo "setup: building bpf-linker 0.13.0 against LLVM 22 (a few minutes, once)"
    LLVM_PREFIX=/usr/lib/llvm-22 cargo install bpf-linker --version 0.13.0 --locked \
        --no-default-features --features llvm-22
fi
if ! cargo deb --version >/dev/null 2>&1; then
    echo "setup: building cargo-deb 3.8.0 (about 2 minutes, once)"
    cargo install cargo-deb --version 3.8.0 --locked
fi
echo "setup: ok"
