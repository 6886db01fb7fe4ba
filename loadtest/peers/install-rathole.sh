#!/bin/sh
# Installs rathole (the peer users compare with) from crates.io into
# target/peers/ (ignored by git; never commit its code or binary).
# Only the noise transport is built (no native-tls, so no OpenSSL needed).
# Usage: loadtest/peers/install-rathole.sh   (from anywhere in the repo)
set -eu
root="$(cd "$(dirname "$0")/../.." && pwd)"
dest="$root/target/peers"
version="${RATHOLE_VERSION:-0.5.0}"
mkdir -p "$dest"
if [ -x "$dest/bin/rathole" ]; then
    echo "rathole already installed: $dest/bin/rathole"
    exit 0
fi
# Not --locked: its lock file pins time 0.3.29, which no longer builds
# with current rustc (type inference error, E0282); newer semver-compatible
# dependencies do.
cargo install rathole --version "$version" \
    --no-default-features --features server,client,noise \
    --root "$dest"
echo "installed $dest/bin/rathole"
