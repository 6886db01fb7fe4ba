#!/usr/bin/env bash
# Joins the amd64 and the arm64 image (two single-architecture OCI layouts
# from build-oci.sh) into one multi-architecture image: an OCI image index
# under the manifests' tag, whose entries carry each manifest's platform,
# so a node's runtime pulls the manifest of its own architecture from the
# one name edge-relay:<tag>.
#
#   deploy/image/build-index.sh [AMD64_LAYOUT [ARM64_LAYOUT]]
#       (default target/image/oci and target/image/arm64/oci)
#
# Writes target/image/multi/ (IMAGE_OUT/multi):
#   oci/                         the layout: index.json -> tag -> the image
#                                index (a blob) -> the two manifests
#   edge-relay-<tag>.oci.tar     the same layout as one tar
# Push both architectures under one name (not run here: no registry):
#   skopeo copy --all oci:target/image/multi/oci:<tag> docker://<registry>/edge-relay:<tag>
#
# No container engine and no tool beyond jq and sha256sum to write it
# (umoci 0.4.7 makes no index). Checked here: every blob the index reaches
# is present with its digest and size, and each manifest's config names
# the architecture its index entry says. With skopeo (Debian's skopeo),
# also as a client reads it: `skopeo copy --all` copies the whole index
# (digests verified), and `skopeo --override-arch A copy` (without --all)
# takes, for each architecture, exactly that architecture's manifest, whose
# config `skopeo inspect` reports as A; without skopeo that part is
# reported SKIPPED.
set -euo pipefail
cd "$(dirname "$0")/../.."
OUT=${IMAGE_OUT:-target/image}
# The image's architectures (.ci/deploy-check reads this line: every
# workload must allow exactly these in its kubernetes.io/arch affinity).
ARCHES=(amd64 arm64)
declare -A LAYOUT=([amd64]=${1:-$OUT/oci} [arm64]=${2:-$OUT/arm64/oci})
M=$OUT/multi
die() { echo "build-index: $*" >&2; exit 1; }
say() { printf '   %-44s %s\n' "$1" "$2"; }
for t in jq sha256sum; do command -v "$t" >/dev/null || die "$t is missing"; done

mapfile -t tags < <(sed -n 's/^ *newTag: *//p' deploy/kubernetes/overlays/*/kustomization.yaml | sort -u)
[ "${#tags[@]}" = 1 ] || die "overlays disagree on newTag: ${tags[*]:-none}"
TAG=${tags[0]}
mapfile -t names < <(sed -n 's/^ *newName: *//p' deploy/kubernetes/overlays/*/kustomization.yaml | sort -u)
[ "${#names[@]}" = 1 ] || die "overlays disagree on newName: ${names[*]:-none}"
NAME=${names[0]}

blob() { echo "$1/blobs/sha256/${2#sha256:}"; }
rm -rf "$M/oci"
mkdir -p "$M/oci/blobs/sha256"
printf '{"imageLayoutVersion":"1.0.0"}' >"$M/oci/oci-layout"
entries=()
for arch in "${ARCHES[@]}"; do
  layout=${LAYOUT[$arch]}
  [ -f "$layout/index.json" ] || die "$layout is not an OCI layout: run ARCH=$arch deploy/image/build-oci.sh"
  desc=$(jq -c --arg t "$TAG" '.manifests[] | select(.annotations["org.opencontainers.image.ref.name"] == $t)' "$layout/index.json")
  [ -n "$desc" ] || die "$layout has no manifest tagged $TAG"
  [ "$(jq -r .mediaType <<<"$desc")" = application/vnd.oci.image.manifest.v1+json ] \
    || die "$layout:$TAG is not a single image manifest"
  manifest=$(jq -r .digest <<<"$desc")
  config=$(jq -r .config.digest "$(blob "$layout" "$manifest")")
  got=$(jq -r '"\(.os)/\(.architecture)"' "$(blob "$layout" "$config")")
  [ "$got" = "linux/$arch" ] || die "$layout:$TAG is $got, expected linux/$arch"
  # Every blob of the image: the manifest, its config, its layers.
  for d in "$manifest" "$config" $(jq -r '.layers[].digest' "$(blob "$layout" "$manifest")"); do
    src=$(blob "$layout" "$d")
    [ -f "$src" ] || die "$layout lacks blob $d"
    cp -l "$src" "$M/oci/blobs/sha256/" 2>/dev/null || cp "$src" "$M/oci/blobs/sha256/"
  done
  # The index entry: the manifest's descriptor and its platform (arm64's
  # variant v8, as registries and containerd name 64-bit ARM).
  platform=$(jq -nc --arg a "$arch" '{architecture: $a, os: "linux"} + (if $a == "arm64" then {variant: "v8"} else {} end)')
  entries+=("$(jq -c --argjson p "$platform" '{mediaType, digest, size, platform: $p}' <<<"$desc")")
  say "linux/$arch" "$manifest"
done
printf '%s\n' "${entries[@]}" \
  | jq -sc '{schemaVersion: 2, mediaType: "application/vnd.oci.image.index.v1+json", manifests: .}' \
  | tr -d '\n' >"$M/index.tmp"
idx=sha256:$(sha256sum "$M/index.tmp" | cut -d' ' -f1)
idx_size=$(stat -c %s "$M/index.tmp")
mv "$M/index.tmp" "$(blob "$M/oci" "$idx")"
jq -n --arg d "$idx" --argjson s "$idx_size" --arg t "$TAG" \
  '{schemaVersion: 2, mediaType: "application/vnd.oci.image.index.v1+json",
    manifests: [{mediaType: "application/vnd.oci.image.index.v1+json", digest: $d, size: $s,
                 annotations: {"org.opencontainers.image.ref.name": $t}}]}' >"$M/oci/index.json"
say "image index ($TAG)" "$idx"

# Every descriptor reachable from index.json: the blob is there, with the
# size and sha256 the descriptor states.
check_desc() { # digest size
  local f
  f=$(blob "$M/oci" "$1")
  [ -f "$f" ] || die "missing blob $1"
  [ "$(stat -c %s "$f")" = "$2" ] || die "blob $1: size $(stat -c %s "$f"), descriptor says $2"
  [ "sha256:$(sha256sum "$f" | cut -d' ' -f1)" = "$1" ] || die "blob $1: content does not match its digest"
}
n=0
check_desc "$idx" "$idx_size"
while read -r d s a; do
  check_desc "$d" "$s"; n=$((n + 1))
  man=$(blob "$M/oci" "$d")
  read -r cd cs < <(jq -r '.config | "\(.digest) \(.size)"' "$man")
  check_desc "$cd" "$cs"; n=$((n + 1))
  [ "$(jq -r .architecture "$(blob "$M/oci" "$cd")")" = "$a" ] || die "manifest $d: config architecture is not $a"
  while read -r ld ls; do check_desc "$ld" "$ls"; n=$((n + 1)); done < <(jq -r '.layers[] | "\(.digest) \(.size)"' "$man")
done < <(jq -r '.manifests[] | "\(.digest) \(.size) \(.platform.architecture)"' "$(blob "$M/oci" "$idx")")
say "blobs reachable from index.json" "$n + the index, digests and sizes match, platforms = configs"

if command -v skopeo >/dev/null; then
  T=$(mktemp -d /tmp/build-index.XXXXXX)
  trap 'rm -rf "$T"' EXIT
  skopeo --insecure-policy copy -q --all "oci:$M/oci:$TAG" "oci:$T/copy:$TAG" \
    || die "skopeo copy --all oci:$M/oci:$TAG failed"
  say "skopeo copy --all (every blob read, digests verified)" "ok"
  for arch in "${ARCHES[@]}"; do
    layout=${LAYOUT[$arch]}
    want=$(jq -r --arg t "$TAG" '.manifests[] | select(.annotations["org.opencontainers.image.ref.name"] == $t) | .digest' "$layout/index.json")
    # What a client of that architecture pulls: skopeo copy without --all
    # copies the one manifest the index names for the platform.
    skopeo --insecure-policy --override-os linux --override-arch "$arch" copy -q \
      "oci:$M/oci:$TAG" "oci:$T/$arch:$TAG" || die "skopeo copy --override-arch $arch failed"
    got=$(jq -r '.manifests[0].digest' "$T/$arch/index.json")
    [ "$got" = "$want" ] || die "for $arch skopeo took manifest $got, expected $want"
    a=$(skopeo --override-os linux --override-arch "$arch" inspect "oci:$M/oci:$TAG" | jq -r .Architecture) \
      || die "skopeo inspect --override-arch $arch failed"
    [ "$a" = "$arch" ] || die "skopeo inspect --override-arch $arch: the image's architecture is $a"
    say "skopeo --override-arch $arch copy / inspect" "$got, architecture $a"
  done
else
  echo "   client check (skopeo copy --all, inspect --override-arch) SKIPPED: no skopeo (apt-get install --no-install-recommends skopeo)"
fi

tar -C "$M/oci" -cf "$M/edge-relay-$TAG.oci.tar" .
echo "== $M/oci:$TAG ($NAME:$TAG, $(printf 'linux/%s+' "${ARCHES[@]}" | sed 's/+$//')), $(du -sh "$M/oci" | cut -f1)"
echo "   push (not run here): skopeo copy --all oci:$M/oci:$TAG docker://$NAME:$TAG"
