#!/usr/bin/env bash
# Builds relay-server and edge-client as fully static executables (glibc,
# crt-static: no musl target needed), copies them to OUT_DIR and checks
# that they are static and that they run.
#
#   deploy/image/build-static.sh [OUT_DIR]     (default target/image/bin)
#   ARCH=arm64 deploy/image/build-static.sh [OUT_DIR]
#
# ARCH (else TARGETARCH, which a container engine sets in
# deploy/Containerfile) picks the architecture: amd64 (the default;
# x86_64-unknown-linux-gnu, built on an x86_64 machine) or arm64
# (aarch64-unknown-linux-gnu, cross-compiled on an x86_64 machine, native
# on an aarch64 one, the latter not run by this project). The
# cross build needs `rustup target add aarch64-unknown-linux-gnu` and
# Debian's gcc-aarch64-linux-gnu (linker, and C compiler and ar for ring)
# and libc6-dev-arm64-cross (static glibc, /usr/aarch64-linux-gnu/lib/libc.a).
# A cross-built binary is run (--version, --help) under qemu-aarch64-static
# (Debian's qemu-user-static) when there is one; without it that run check
# is skipped, said so, and the static checks still apply.
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
# TARGETARCH: what deploy/Containerfile's engine passes for --platform.
ARCH=${ARCH:-${TARGETARCH:-amd64}}
case $ARCH in
  amd64) TRIPLE=x86_64-unknown-linux-gnu ;;
  arm64) TRIPLE=aarch64-unknown-linux-gnu ;;
  *) echo "build-static: ARCH must be amd64 or arm64, not '$ARCH'" >&2; exit 1 ;;
esac
TARGET_DIR=${CARGO_TARGET_DIR:-target}
PROFILE=${BUILD_PROFILE:-release}
# cargo names the dev profile's directory "debug"; every other profile's
# directory is its own name.
PROFILE_DIR=$PROFILE
[ "$PROFILE" = dev ] && PROFILE_DIR=debug
BINS=(relay-server edge-client)

die() { echo "build-static: $*" >&2; exit 1; }
host=$(uname -m)
# RUN: what runs the built binaries for the checks below (empty: they run
# natively); RUN_SKIP: why they cannot be run here at all.
RUN=()
RUN_SKIP=
OBJCOPY=objcopy
if [ "$TRIPLE" = "$host-unknown-linux-gnu" ]; then
  # Native, as before: the host's static glibc.
  [ -e "/usr/lib/$host-linux-gnu/libc.a" ] || die "no static glibc (libc.a): apt-get install libc6-dev"
elif [ "$host" = x86_64 ] && [ "$ARCH" = arm64 ]; then
  # Cross: Debian's aarch64 cross toolchain links (cargo's linker for the
  # target) and compiles ring's C and assembly (cc crate: CC_/AR_<triple>);
  # its sysroot has the static glibc.
  # The host's objcopy reads only its own architecture's objects.
  OBJCOPY=aarch64-linux-gnu-objcopy
  for t in aarch64-linux-gnu-gcc aarch64-linux-gnu-ar aarch64-linux-gnu-objcopy; do
    command -v "$t" >/dev/null || die "$t is missing (apt-get install gcc-aarch64-linux-gnu)"
  done
  [ -e /usr/aarch64-linux-gnu/lib/libc.a ] || die "no aarch64 static glibc (/usr/aarch64-linux-gnu/lib/libc.a): apt-get install libc6-dev-arm64-cross"
  rustup target list --installed 2>/dev/null | grep -qx "$TRIPLE" \
    || die "rust target $TRIPLE is not installed: rustup target add $TRIPLE"
  export CARGO_TARGET_AARCH64_UNKNOWN_LINUX_GNU_LINKER=aarch64-linux-gnu-gcc
  export CC_aarch64_unknown_linux_gnu=aarch64-linux-gnu-gcc
  export AR_aarch64_unknown_linux_gnu=aarch64-linux-gnu-ar
  if command -v qemu-aarch64-static >/dev/null; then
    RUN=(qemu-aarch64-static)
  elif command -v qemu-aarch64 >/dev/null; then
    RUN=(qemu-aarch64)
  else
    RUN_SKIP="no qemu-aarch64-static or qemu-aarch64 (apt-get install qemu-user-static) to run aarch64 code on $host"
  fi
else
  die "building $TRIPLE on $host is not set up (native, or arm64 cross-compiled on x86_64)"
fi
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
  "$OBJCOPY" --strip-debug "$src" "$OUT/$b.tmp"
  chmod 0755 "$OUT/$b.tmp"
  mv "$OUT/$b.tmp" "$OUT/$b"
  # Static: no program interpreter, no NEEDED libraries.
  if readelf -lW "$OUT/$b" | grep -q 'Requesting program interpreter'; then
    die "$b has a program interpreter: not static"
  fi
  if readelf -dW "$OUT/$b" | grep -q '(NEEDED)'; then
    die "$b needs shared libraries: $(readelf -dW "$OUT/$b" | grep '(NEEDED)' | tr -s ' ')"
  fi
  # The machine the ELF header names (readelf: "Advanced Micro Devices
  # X86-64" / "AArch64").
  machine=$(readelf -hW "$OUT/$b" | sed -n 's/^ *Machine: *//p')
  case $ARCH:$machine in
    amd64:*X86-64 | arm64:AArch64) ;;
    *) die "$b is built for '$machine', not $ARCH" ;;
  esac
  # The host's ldd reads a foreign static ELF too ("not a dynamic
  # executable"); for a foreign dynamic one it would say the same, which is
  # why the two readelf checks above come first.
  ldd_out=$(ldd "$OUT/$b" 2>&1 | sed 's/^[[:space:]]*//' || true)
  grep -Eq 'not a dynamic executable|statically linked' <<<"$ldd_out" || die "$b: ldd says: $ldd_out"
  if [ -n "$RUN_SKIP" ]; then
    got="(not run: $RUN_SKIP)"
  else
    got=$("${RUN[@]}" "$OUT/$b" --version) || die "$b --version failed"
    [ "$got" = "$b $version" ] || die "$b --version printed '$got', expected '$b $version'"
    "${RUN[@]}" "$OUT/$b" --help >/dev/null || die "$b --help failed"
  fi
  printf '   %-13s %s, %s, %s MiB, ldd: %s\n' "$b" "$got" "$machine" "$(($(stat -c %s "$OUT/$b") / 1048576))" "$ldd_out"
done
if [ -n "$RUN_SKIP" ]; then
  echo "   run check (--version, --help) SKIPPED: $RUN_SKIP"
else
  "${RUN[@]}" "$OUT/relay-server" route-agent --help >/dev/null || die "relay-server route-agent --help failed"
  [ "${#RUN[@]}" = 0 ] || echo "   --version, --help and route-agent --help ran under ${RUN[*]}"
fi
echo "== static binaries ($ARCH) in $OUT"
