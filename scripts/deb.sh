#!/usr/bin/env bash
# Builds the Debian package of xdpvs: target/debian/xdpvs_<version>-1_<arch>.deb (release
# profile), with the binary in /usr/sbin, /etc/xdpvs/xdpvs.toml, xdpvs.service (enabled, not
# started, at install), the manual pages and the docs. tests/deb.rs builds it with this script
# and checks what is inside.
#
#   scripts/deb.sh            # prints the path of the .deb on its last line
#
# Needs cargo-deb and dpkg-dev (dpkg-shlibdeps, for the $auto dependencies); scripts/setup.sh
# installs both. Root is not needed. The XDP program is built by build.rs as for any build.
#
# Environment:
#   XDPVS_DEB_OUT  directory to write the .deb into (default target/debian)
set -euo pipefail

cd "$(dirname "$0")/.."
for d in "${CARGO_HOME:-$HOME/.cargo}/bin" /root/.cargo/bin; do
    [[ -d $d && ":$PATH:" != *":$d:"* ]] && PATH="$d:$PATH"
done
export PATH

if ! cargo deb --version >/dev/null 2>&1; then
    echo "deb.sh: cargo-deb is not installed (scripts/setup.sh installs it)" >&2
    exit 1
fi
if ! command -v dpkg-shlibdeps >/dev/null 2>&1; then
    echo "deb.sh: dpkg-shlibdeps is missing (apt-get install dpkg-dev; scripts/setup.sh does)" >&2
    exit 1
fi

# Built here rather than by cargo-deb, because the manual pages come from the built binary
# (generated from the clap definitions) and cargo-deb resolves its asset globs before it builds.
cargo build --release --locked --bin xdpvs
bin=${CARGO_TARGET_DIR:-target}/release/xdpvs
rm -rf target/man
"$bin" man target/man >/dev/null

out=${XDPVS_DEB_OUT:-target/debian}
mkdir -p "$out"
# --no-build: the binary above; --locked: Cargo.lock as committed; --strip: the debug info of
# [profile.release] stays out of the package (3 MB instead of 14). cargo-deb gzips the man pages.
cargo deb --no-build --locked --strip --output "$out"
