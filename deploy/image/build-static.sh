#!/usr/bin/env bash
# Builds relay-server and edge-client as fully static executables (glibc,
# crt-static: no musl target needed), copies them to OUT_DIR and checks
# that they are static and that they run.
#
#   deploy/image/build-static.sh [OUT_DIR]     (default target/image/bin)
#
# BUILD_PROFILE picks the cargo profile (default release, what images
# ship). CI sets BUILD_PROFILE=image-check (Cargo.toml: unoptimised, no
# debug info): the same static link, checks and image recipe in about a
# third of the build time, because what CI verifies here is the recipe, not
# the optimiser (the release profile is built and measured by loadtest).
#
# Honours CARGO_TARGET_DIR. The build uses its own target triple directory
# (RUSTFLAGS apply to the target only, not to build scripts and proc
# macros), so it shares nothing with `cargo build`'s target/debug.
# deploy/Containerfile runs this same script in its builder stage.
#
# Static glibc and names: getaddrinfo in a static binary reads
# /etc/nsswitch.conf, /etc/hosts and /etc/resolv.conf itself ("files" and
# "dns" are built into glibc since 2.34, nothing is dlopened for them);
# deploy/image/verify-oci.sh proves it in a root with nothing else.
set -euo pipefail
cd "$(dirname "$0")/../.."
OUT=${1:-target/image/bin}
TRIPLE=x86_64-unknown-linux-gnu
TARGET_DIR=${CARGO_TARGET_DIR:-target}
PROFILE=${BUILD_PROFILE:-release}
# cargo names the dev profile's directory "debug"; every other profile's
# directory is its own name.
PROFILE_DIR=$PROFILE
[ "$PROFILE" = dev ] && PROFILE_DIR=debug
BINS=(relay-server edge-client)

die() { echo "build-static: $*" >&2; exit 1; }
[ "$(uname -m)" = x86_64 ] || die "only $TRIPLE is set up here (this is $(uname -m))"
[ -e /usr/lib/x86_64-linux-gnu/libc.a ] || die "no static glibc (libc.a): apt-get install libc6-dev"
for t in objcopy readelf ldd; do
  command -v "$t" >/dev/null || die "$t is missing (apt-get install binutils libc-bin)"
done

echo "== cargo build (static, $TRIPLE, profile $PROFILE)"
start=$(date +%s)
RUSTFLAGS="${RUSTFLAGS:+$RUSTFLAGS }-C target-feature=+crt-static" \
  cargo build --profile "$PROFILE" --locked --target "$TRIPLE" -p relay-server -p edge-client --bins
echo "   built in $(($(date +%s) - start)) s"

mkdir -p "$OUT"
version=$(sed -n 's/^version = "\(.*\)"$/\1/p' Cargo.toml | head -1)
for b in "${BINS[@]}"; do
  src=$TARGET_DIR/$TRIPLE/$PROFILE_DIR/$b
  [ -x "$src" ] || die "$src was not built"
  # The release profile keeps line tables (debug = "line-tables-only", for
  # backtraces): 107 MiB for relay-server. The image gets them stripped
  # (24 MiB; the symbol table stays, so backtraces still name functions);
  # the unstripped binary stays in the target directory.
  objcopy --strip-debug "$src" "$OUT/$b.tmp"
  chmod 0755 "$OUT/$b.tmp"
  mv "$OUT/$b.tmp" "$OUT/$b"
  # Static: no program interpreter, no NEEDED libraries.
  if readelf -lW "$OUT/$b" | grep -q 'Requesting program interpreter'; then
    die "$b has a program interpreter: not static"
  fi
  if readelf -dW "$OUT/$b" | grep -q '(NEEDED)'; then
    die "$b needs shared libraries: $(readelf -dW "$OUT/$b" | grep '(NEEDED)' | tr -s ' ')"
  fi
  ldd_out=$(ldd "$OUT/$b" 2>&1 | sed 's/^[[:space:]]*//' || true)
  grep -Eq 'not a dynamic executable|statically linked' <<<"$ldd_out" || die "$b: ldd says: $ldd_out"
  got=$("$OUT/$b" --version) || die "$b --version failed"
  [ "$got" = "$b $version" ] || die "$b --version printed '$got', expected '$b $version'"
  "$OUT/$b" --help >/dev/null || die "$b --help failed"
  printf '   %-13s %s, %s MiB, ldd: %s\n' "$b" "$got" "$(($(stat -c %s "$OUT/$b") / 1048576))" "$ldd_out"
done
"$OUT/relay-server" route-agent --help >/dev/null || die "relay-server route-agent --help failed"
echo "== static binaries in $OUT"
