#!/usr/bin/env bash
# Assembles the edge-relay image as an OCI image layout without a container
# engine: the static binaries of build-static.sh plus `nft` and `ip` (capture
# and the route agent run them) and `conntrack` (capture deletes stale UDP
# conntrack entries with it when Service capture changes) with their shared
# libraries, unpacked from Debian packages (apt-get download + dpkg-deb),
# put together with umoci.
#
#   deploy/image/build-oci.sh [BIN_DIR]     (default target/image/bin)
#   ARCH=arm64 deploy/image/build-oci.sh [BIN_DIR]
#                                  (default target/image/arm64/bin)
#
# ARCH (amd64, the default, or arm64) is the image's architecture: the
# binaries' (ARCH=arm64 deploy/image/build-static.sh) and the Debian
# packages'. Packages of the host's own architecture come through the
# host's apt as before; another architecture's through a private apt state
# under $OUT/apt (the host's sources.list, its own package lists, an empty
# dpkg status): nothing of the host's apt or dpkg configuration changes (no
# `dpkg --add-architecture`). The arm64 binaries' --version runs under
# qemu-aarch64-static (qemu-user-static) when the host is not arm64;
# without qemu that check is skipped, said so.
#
# Needs: root (the layers must hold root-owned files), umoci, apt-get with
# current package lists (`apt-get update`) for this machine's Debian release,
# dpkg-deb, jq. Writes under target/image/ (target/image/arm64/ for arm64;
# IMAGE_OUT overrides):
#   oci/             the OCI image layout, tag = the manifests' newTag
#   edge-relay-<tag>.oci.tar   the same layout as one tar (oci-archive)
#   rootfs/          the Debian layer's tree (kept for inspection)
#   debs/            the downloaded packages
# Then run deploy/image/verify-oci.sh to unpack and test the image.
#
# The image is what deploy/Containerfile builds with an engine, minus
# Debian's base system: the same /usr/local/bin paths, PATH, user and CMD.
set -euo pipefail
cd "$(dirname "$0")/../.."
ARCH=${ARCH:-amd64}
die() { echo "build-oci: $*" >&2; exit 1; }
case $ARCH in
  amd64) OUT=${IMAGE_OUT:-target/image}; ELF_MACHINE='X86-64' ;;
  arm64) OUT=${IMAGE_OUT:-target/image/arm64}; ELF_MACHINE='AArch64' ;;
  *) die "ARCH must be amd64 or arm64, not '$ARCH'" ;;
esac
BIN=${1:-$OUT/bin}

[ "$(id -u)" = 0 ] || die "run as root (the image's files must be owned by root)"
for t in umoci apt-get apt-cache dpkg-deb jq readelf; do
  command -v "$t" >/dev/null || die "$t is missing (apt-get install umoci jq binutils)"
done
for b in relay-server edge-client; do
  [ -x "$BIN/$b" ] || die "$BIN/$b missing: run ARCH=$ARCH deploy/image/build-static.sh first"
  m=$(readelf -hW "$BIN/$b" | sed -n 's/^ *Machine: *//p')
  [[ $m == *"$ELF_MACHINE" ]] || die "$BIN/$b is built for '$m', not $ARCH"
done

# Running the binaries (their --version), and apt for ARCH.
HOST_ARCH=$(dpkg --print-architecture)
RUN=()
RUN_SKIP=
APT=()
if [ "$ARCH" != "$HOST_ARCH" ]; then
  if [ "$ARCH" = arm64 ] && command -v qemu-aarch64-static >/dev/null; then
    RUN=(qemu-aarch64-static)
  else
    RUN_SKIP="no qemu-aarch64-static here (apt-get install qemu-user-static) to run $ARCH binaries on $HOST_ARCH"
  fi
  # A private apt state for ARCH: the host's sources, lists of ARCH only,
  # an empty dpkg status (nothing is installed for ARCH), no update hooks
  # (appstream, packagekit) and no DEP-11 metadata.
  mkdir -p "$OUT"
  A=$(realpath "$OUT")/apt
  mkdir -p "$A/lists/partial" "$A/cache/archives/partial"
  : >"$A/status"
  APT=(-o "APT::Architecture=$ARCH" -o "APT::Architectures::=$ARCH"
       -o "Dir::State::Lists=$A/lists" -o "Dir::State::status=$A/status" -o "Dir::Cache=$A/cache"
       -o APT::Sandbox::User=root
       -o Acquire::IndexTargets::deb::DEP-11::DefaultEnabled=false
       -o Acquire::IndexTargets::deb::DEP-11-icons::DefaultEnabled=false
       -o Acquire::IndexTargets::deb::DEP-11-icons-small::DefaultEnabled=false
       -o APT::Update::Post-Invoke-Success::= -o APT::Update::Post-Invoke::=)
  echo "== apt-get update for $ARCH (private state in $A)"
  apt-get "${APT[@]}" -qq update >/dev/null || die "apt-get update for $ARCH failed"
fi

# The tag: the one every overlay's `images:` entry uses, which must also be
# the binaries' version.
mapfile -t tags < <(sed -n 's/^ *newTag: *//p' deploy/kubernetes/overlays/*/kustomization.yaml | sort -u)
[ "${#tags[@]}" = 1 ] || die "overlays disagree on newTag: ${tags[*]:-none}"
TAG=${tags[0]}
mapfile -t names < <(sed -n 's/^ *newName: *//p' deploy/kubernetes/overlays/*/kustomization.yaml | sort -u)
[ "${#names[@]}" = 1 ] || die "overlays disagree on newName: ${names[*]:-none}"
NAME=${names[0]}
if [ -n "$RUN_SKIP" ]; then
  echo "   binaries' --version against the tag SKIPPED: $RUN_SKIP"
else
  for b in relay-server edge-client; do
    v=$("${RUN[@]}" "$BIN/$b" --version) || die "$b --version failed"
    [ "$v" = "$b $TAG" ] || die "$b --version is '$v', the manifests' tag is $TAG"
  done
fi

# Debian packages: these roots and their Depends, recursively, first
# alternative of each; not the package manager's own (nothing installs
# packages in this image) nor libcap2-bin (setcap/capsh, which `ip` does not
# run). conntrack: `conntrack -D` in transport/src/capture/services.rs
# (its Depends add libnetfilter-conntrack3 and libnfnetlink0; a missing
# binary only logs at debug level, so verify-oci.sh checks it is there).
ROOTS=(nftables iproute2 netbase conntrack)
SKIP=" debconf debconf-2.0 cdebconf dpkg tar install-info perl-base libcap2-bin "
apt-cache "${APT[@]}" show nftables >/dev/null 2>&1 || die "apt-cache knows no nftables ($ARCH): run apt-get update"
declare -A seen=()
queue=("${ROOTS[@]}")
while [ "${#queue[@]}" -gt 0 ]; do
  p=${queue[0]}; queue=("${queue[@]:1}")
  [ -n "${seen[$p]:-}" ] && continue
  seen[$p]=1
  # "  Depends: x" or " |Depends: x" (an alternative follows: keep the first).
  alt=0
  while read -r line; do
    dep=${line##*: }
    case $line in
      "|"*) [ "$alt" = 0 ] && { alt=1; want=$dep; } ; continue ;;
      *) if [ "$alt" = 1 ]; then alt=0; dep=$want; fi ;;
    esac
    dep=${dep%%:*}                 # libc6:amd64 -> libc6
    case $dep in "<"*) continue ;; esac  # a virtual package left alone
    [[ $SKIP == *" $dep "* ]] && continue
    queue+=("$dep")
  done < <(apt-cache "${APT[@]}" depends --no-recommends --no-suggests --no-conflicts --no-breaks \
             --no-replaces --no-enhances "$p" | sed -n 's/^ *\(|\?\)\(Pre\)\?Depends: /\1Depends: /p')
done
mapfile -t PKGS < <(printf '%s\n' "${!seen[@]}" | sort)
echo "== ${#PKGS[@]} Debian packages ($ARCH): ${PKGS[*]}"

rm -rf "$OUT/debs"
mkdir -p "$OUT/debs"
(cd "$OUT/debs" && apt-get "${APT[@]}" download -q -o APT::Sandbox::User=root "${PKGS[@]}" >/dev/null) || die "apt-get download failed"

ROOT=$OUT/rootfs
rm -rf "$ROOT" "$OUT/oci"
# Merged /usr, as Debian bookworm images have: /bin, /sbin, /lib, /lib64
# are links into /usr, and tar keeps them (--keep-directory-symlink).
mkdir -p "$ROOT"/usr/{bin,sbin,lib,lib64}
for d in bin sbin lib lib64; do ln -s "usr/$d" "$ROOT/$d"; done
: >"$OUT/packages.txt"
for p in "${PKGS[@]}"; do
  debs=("$OUT/debs/${p}_"*.deb)
  if [ "${#debs[@]}" != 1 ] || [ ! -f "${debs[0]}" ]; then
    die "expected one downloaded .deb for $p, found: ${debs[*]}"
  fi
  deb=${debs[0]}
  dpkg-deb --fsys-tarfile "$deb" | tar -x --keep-directory-symlink -C "$ROOT" \
    || die "unpacking $deb"
  a=$(dpkg-deb -f "$deb" Architecture)
  [ "$a" = "$ARCH" ] || [ "$a" = all ] || die "$deb is for $a, not $ARCH"
  dpkg-deb -f "$deb" Package Version | paste -sd' ' >>"$OUT/packages.txt"
done
# Docs, man pages, translations, package-manager and init leftovers.
rm -rf "$ROOT"/usr/share/{doc,man,info,locale,lintian,bug,bash-completion} \
       "$ROOT"/usr/lib/systemd "$ROOT"/etc/init.d "$ROOT"/etc/default
# What a container runtime or Kubernetes mounts over, and what glibc reads.
mkdir -p "$ROOT"/{dev,proc,sys,run,root,usr/local/bin,etc/edge-relay,var/lib/edge-relay,run/edge-relay}
install -d -m 1777 "$ROOT/tmp"
printf 'root:x:0:0:root:/root:/usr/sbin/nologin\n' >"$ROOT/etc/passwd"
printf 'root:x:0:\n' >"$ROOT/etc/group"
# hosts: /etc/hosts first, then DNS (the edge dials the relay by name; the
# relay's CONNECT targets resolve through it too).
printf 'passwd: files\ngroup: files\nshadow: files\nhosts: files dns\nnetworks: files\nprotocols: files\nservices: files\n' \
  >"$ROOT/etc/nsswitch.conf"
printf '127.0.0.1\tlocalhost\n::1\tlocalhost ip6-localhost ip6-loopback\n' >"$ROOT/etc/hosts"
printf '# replaced by the container runtime\n' >"$ROOT/etc/resolv.conf"
printf 'include /etc/ld.so.conf.d/*.conf\n' >"$ROOT/etc/ld.so.conf"
if [ "$ARCH" = "$HOST_ARCH" ]; then
  ldconfig -r "$ROOT" || die "ldconfig -r $ROOT"
elif [ -z "$RUN_SKIP" ]; then
  # The host's ldconfig leaves another architecture's libraries out (its
  # cache for the arm64 root listed none): ARCH's own ldconfig (libc-bin,
  # static; downloaded, not put in the image) under qemu.
  (cd "$OUT/debs" && apt-get "${APT[@]}" download -q libc-bin >/dev/null) || die "apt-get download libc-bin ($ARCH) failed"
  rm -rf "$OUT/ldconfig" && mkdir -p "$OUT/ldconfig"
  dpkg-deb -x "$OUT/debs"/libc-bin_*.deb "$OUT/ldconfig"
  "${RUN[@]}" "$OUT/ldconfig/sbin/ldconfig" -r "$ROOT" || die "ldconfig -r $ROOT ($ARCH, under ${RUN[*]})"
  rm -rf "$OUT/debs"/libc-bin_*.deb "$OUT/ldconfig"
else
  # No cache: the loader then searches its default (multiarch) directories.
  echo "   ld.so.cache SKIPPED ($RUN_SKIP): the loader searches its default directories"
fi
[ ! -e "$ROOT/etc/ld.so.cache" ] || [ "$(stat -c %s "$ROOT/etc/ld.so.cache")" -gt 200 ] \
  || die "$ROOT/etc/ld.so.cache lists no library"
mkdir -p "$ROOT/usr/share/edge-relay"
cp "$OUT/packages.txt" "$ROOT/usr/share/edge-relay/debian-packages.txt"

IMG="$OUT/oci:$TAG"
BUNDLE=$OUT/bundle
rm -rf "$BUNDLE"
umoci init --layout "$OUT/oci"
umoci new --image "$IMG"
# Layers through unpack + repack, not `umoci insert`: umoci 0.4.7's insert
# leaves the tar without its end-of-archive blocks (umoci issue #436, fixed
# after 0.4.7), which GNU tar and other strict readers reject. Checked below.
umoci unpack --image "$IMG" "$BUNDLE" >/dev/null
cp -a "$ROOT/." "$BUNDLE/rootfs/"
umoci repack --refresh-bundle --image "$IMG" \
  --history.created_by "Debian ($ARCH): ${PKGS[*]} (deploy/image/build-oci.sh)" "$BUNDLE"
# Second layer: the binaries, which change more often than Debian's files.
install -m 0755 "$BIN/relay-server" "$BIN/edge-client" "$BUNDLE/rootfs/usr/local/bin/"
umoci repack --image "$IMG" \
  --history.created_by "relay-server, edge-client $TAG, static (deploy/image/build-static.sh)" "$BUNDLE"
rm -rf "$BUNDLE"
# As deploy/Containerfile: no entrypoint (the manifests set command), root.
umoci config --image "$IMG" --no-history \
  --os linux --architecture "$ARCH" \
  --config.env "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin" \
  --config.user 0:0 --config.workingdir / \
  --config.cmd /usr/local/bin/relay-server --config.cmd --help \
  --config.label "org.opencontainers.image.title=edge-relay" \
  --config.label "org.opencontainers.image.version=$TAG"
umoci gc --layout "$OUT/oci"
tar -C "$OUT/oci" -cf "$OUT/edge-relay-$TAG.oci.tar" .

manifest=$(jq -r --arg t "$TAG" '.manifests[] | select(.annotations["org.opencontainers.image.ref.name"] == $t) | .digest' "$OUT/oci/index.json")
[ -n "$manifest" ] || die "index.json has no manifest for $TAG"
# Every layer a complete tar for a strict reader (GNU tar), with the files
# expected in it.
mapfile -t layers < <(jq -r '.layers[].digest' "$OUT/oci/blobs/sha256/${manifest#sha256:}")
[ "${#layers[@]}" = 2 ] || die "expected 2 layers, the manifest has ${#layers[@]}"
for l in "${layers[@]}"; do
  gzip -dc "$OUT/oci/blobs/sha256/${l#sha256:}" | tar -t >"$OUT/layer.txt" || die "layer $l is not a complete tar"
done
grep -qx 'usr/local/bin/relay-server' "$OUT/layer.txt" || die "the last layer lacks usr/local/bin/relay-server"
rm -f "$OUT/layer.txt"
echo "== $OUT/oci:$TAG ($NAME:$TAG, linux/$ARCH)"
echo "   manifest $manifest"
jq -r '.layers[] | "   layer \(.digest) \(.size) bytes"' "$OUT/oci/blobs/sha256/${manifest#sha256:}"
echo "   layout $(du -sh "$OUT/oci" | cut -f1), archive $OUT/edge-relay-$TAG.oci.tar"
echo "   push (not run here): skopeo copy oci:$OUT/oci:$TAG docker://$NAME:$TAG"
