#!/usr/bin/env bash
# Unpacks the OCI image that build-oci.sh made and runs it the way a
# container runtime would, without one: as root, in a fresh network
# namespace, chrooted into the unpacked root filesystem mounted read-only
# (the manifests' readOnlyRootFilesystem), with /proc, /dev, a writable
# /etc/edge-relay and an /etc/hosts bind-mounted over the image's (as the
# kubelet does).
#
#   deploy/image/verify-oci.sh [LAYOUT]     (default target/image/oci)
#
# In the image root:
#   - config: user 0, PATH with /usr/sbin, CMD as deploy/Containerfile; the
#     manifests' commands exist;
#   - relay-server/edge-client --version (= the tag), nft --version, ip -V,
#     conntrack --version;
#   - the image's ip and nft change and list this namespace's routes and
#     ruleset; its conntrack deletes a UDP entry made in this namespace with
#     the arguments capture uses (conntrack -D -p udp --orig-dst --dport);
#   - a session: relay-server and edge-client (dev PKI), the edge dialing
#     the relay by a name that only /etc/hosts knows, with capture on: the
#     edge's own nft/ip calls (found through PATH) install its table and
#     rules, and a SIGTERM removes them.
# In a bare root (the two static binaries, /etc/hosts, /etc/nsswitch.conf,
# /etc/resolv.conf from the image, nothing else: no libc, no loader): the
# same session without capture (static glibc resolves names from
# /etc/hosts by itself), and a name absent from /etc/hosts fails to resolve.
#
# Both sessions are also checked through the relay's admin API
# (GET /v1/sessions lists edge-1 with agent edge-client/<tag>).
#
# The image's architecture is read from its config. An arm64 image on an
# x86_64 machine is run under qemu-user (qemu-aarch64-static, copied into
# the jail's /tmp and run by chroot in front of every command, so the
# programs still see only the image's root; there is no binfmt_misc
# registration). qemu-user 7.2 (Debian bookworm) passes only NETLINK_ROUTE
# (and uevent, audit) netlink sockets through, and not every rtnetlink
# message (no RTM_GETRULE), so for arm64 under qemu:
#   - nft and conntrack do not run (NETLINK_NETFILTER: "Protocol not
#     supported"; conntrack --version crashes): their loader resolves every
#     library instead (ld-linux-aarch64.so.1 --list, no "not found");
#   - ip -V and ip route add/show/del run;
#   - the image session runs without capture (its nft and ip rule calls
#     could not run; and the edge's exec of nft would need binfmt_misc);
#   - the bare-root session and the unresolvable name run as on amd64.
# Without qemu-aarch64-static only the unpack and the config are checked,
# and the run checks are reported SKIPPED.
#
# Needs root, umoci, jq, ip, unshare, chroot, curl. Traffic stays on the
# loopback of the namespace it creates; the namespace and the mounts are
# removed on exit.
set -euo pipefail

if [ "${1:-}" = --inside ]; then
  inside=1; T=$2; TAG=$3; IMG_PATH=$4; EMU_NAME=${5:-}
else
  inside=0
fi
die() { echo "verify-oci: $*" >&2; exit 1; }
say() { printf '   %-58s %s\n' "$1" "$2"; }

# ---- in the namespace (ip netns exec + unshare --mount): mounts are
# private to this process and vanish with it.
if [ "$inside" = 1 ]; then
  # The image's environment only (its PATH finds nft and ip, for us and for
  # the binaries' own calls); env finds chroot on the host with that PATH.
  JAIL=(env -i PATH="$IMG_PATH" RUST_LOG=info NO_COLOR=1 chroot)
  # EMU: the emulator in front of every command in the jail (copied into
  # the jail's /tmp by mount_root), or nothing. qemu-user does not search
  # PATH, so a bare command name is looked up in the image's PATH here.
  EMU=()
  [ -n "$EMU_NAME" ] && EMU=("/tmp/$EMU_NAME")
  resolve() { # root command
    local r=$1 c=$2 d
    if [ "${#EMU[@]}" = 0 ] || [[ $c == */* ]]; then echo "$c"; return; fi
    IFS=: read -ra dirs <<<"$IMG_PATH"
    for d in "${dirs[@]}"; do
      [ -x "$r$d/$c" ] && { echo "$d/$c"; return; }
    done
    echo "$c"
  }
  jail() { local r=$1 c; c=$(resolve "$1" "$2"); shift 2; "${JAIL[@]}" "$r" "${EMU[@]}" "$c" "$@"; }
  # has PATTERN CMD...: CMD succeeds and its output matches (no pipe into
  # grep -q, whose early exit would fail the command under pipefail).
  has() { local pat=$1 out; shift; out=$("$@") || return 1; grep -q -- "$pat" <<<"$out"; }
  # Background processes are started as "${JAIL[@]}" (not through the
  # function, which would fork a shell): $! is then the binary's own pid
  # (env and chroot exec it). Whatever is left is stopped on exit.
  PIDS=()
  # shellcheck disable=SC2317  # called by the trap
  stop_all() {
    local p
    for p in "${PIDS[@]}"; do kill -KILL "$p" 2>/dev/null || true; done
  }
  trap stop_all EXIT
  mount_root() { # src dir
    local src=$1 r=$2
    mkdir -p "$r"
    mount --bind "$src" "$r"
    mount -o remount,bind,ro "$r"
    mount -t proc proc "$r/proc"
    mount --bind /dev "$r/dev"
    mount -t tmpfs -o mode=0755 tmpfs "$r/etc/edge-relay"
    mount -t tmpfs -o mode=1777 tmpfs "$r/tmp"
    mount --bind "$T/hosts" "$r/etc/hosts"
    if touch "$r/.probe" 2>/dev/null; then die "$r: root filesystem is writable"; fi
    if [ -n "$EMU_NAME" ]; then install -m 0755 "$T/$EMU_NAME" "$r/tmp/$EMU_NAME"; fi
  }
  wait_log() { # file pattern seconds
    local i
    for ((i = 0; i < $3 * 10; i++)); do
      grep -q -- "$2" "$1" 2>/dev/null && return 0
      sleep 0.1
    done
    return 1
  }
  session() { # root label capture(true|false)
    local r=$1 label=$2 capture=$3 rpid epid rc
    jail "$r" /usr/local/bin/relay-server dev-certs --out /etc/edge-relay/certs \
      --node edge-1 --relay-name relay.image-test >/dev/null || die "$label: dev-certs"
    cat >"$r/etc/edge-relay/relay.toml" <<TOML
relay_id = "relay-image"
tunnel_routes = ["10.96.0.0/12"]
[listen]
quic = "127.0.0.1:8443"
admin = "127.0.0.1:9090"
[tls]
cert = "/etc/edge-relay/certs/relay.pem"
key = "/etc/edge-relay/certs/relay-key.pem"
client_ca = "/etc/edge-relay/certs/ca.pem"
[nodes]
"edge-1" = ["10.244.7.0/24"]
TOML
    cat >"$r/etc/edge-relay/edge.toml" <<TOML
node = "edge-1"
relay = "relay.image-test:8443"
server_name = "relay.image-test"
routes = ["10.244.7.0/24"]
[tls]
cert = "/etc/edge-relay/certs/edge-1.pem"
key = "/etc/edge-relay/certs/edge-1-key.pem"
relay_ca = "/etc/edge-relay/certs/ca.pem"
[capture]
enabled = $capture
# As the shipped edge configs: after SIGTERM, refusals only (checked below).
hold_after_exit = "10m"
TOML
    "${JAIL[@]}" "$r" "${EMU[@]}" /usr/local/bin/relay-server --config /etc/edge-relay/relay.toml \
      >"$T/$label-relay.log" 2>&1 &
    rpid=$!
    PIDS+=("$rpid")
    "${JAIL[@]}" "$r" "${EMU[@]}" /usr/local/bin/edge-client --config /etc/edge-relay/edge.toml \
      >"$T/$label-edge.log" 2>&1 &
    epid=$!
    PIDS+=("$epid")
    if ! wait_log "$T/$label-edge.log" "session up" 20; then
      tail -20 "$T/$label-relay.log" "$T/$label-edge.log" >&2
      die "$label: no session within 20 s"
    fi
    grep -q 'session up.*remote=127.0.0.1:8443' "$T/$label-edge.log" \
      || { cat "$T/$label-edge.log" >&2; die "$label: session up, but not to 127.0.0.1:8443 (relay.image-test in /etc/hosts)"; }
    say "$label: edge dialed relay.image-test:8443 (/etc/hosts)" "session up, $(grep -o 'transport="[a-z]*"' "$T/$label-edge.log" | head -1)"
    # The relay's side: its admin API (loopback, no token) lists the session.
    local sessions
    sessions=$(curl -sf --max-time 5 http://127.0.0.1:9090/v1/sessions) || die "$label: GET /v1/sessions on the relay's admin API failed"
    jq -e --arg a "edge-client/$TAG" 'any(.[]; .node == "edge-1" and .agent == $a and (.routes | index("10.244.7.0/24")))' \
      <<<"$sessions" >/dev/null || die "$label: the relay's /v1/sessions does not list edge-1 (edge-client/$TAG, 10.244.7.0/24): $sessions"
    say "$label: relay admin API GET /v1/sessions" "edge-1, $(jq -r '.[0] | "\(.agent), \(.transport), routes \(.routes | join(","))"' <<<"$sessions")"
    if [ "$capture" = true ]; then
      local ok=0 i
      for ((i = 0; i < 100; i++)); do
        if jail "$r" nft list table inet edge_relay >/dev/null 2>&1 \
           && has '^7100:' jail "$r" ip rule show; then ok=1; break; fi
        sleep 0.1
      done
      [ "$ok" = 1 ] || { cat "$T/$label-edge.log" >&2; die "$label: the edge's capture (nft table inet edge_relay, ip rule 7100) did not appear"; }
      say "$label: the edge's capture ran the image's nft and ip" "table inet edge_relay, $(jail "$r" ip rule show | grep -c '^7100:') rule(s) pref 7100"
    fi
    kill -TERM "$epid"
    rc=0; wait "$epid" || rc=$?
    [ "$rc" = 0 ] || { cat "$T/$label-edge.log" >&2; die "$label: edge-client exited $rc after SIGTERM"; }
    if [ "$capture" = true ]; then
      # A clean exit leaves only refusals of what was captured, for
      # capture.hold_after_exit as the manifests set it (nft sets with
      # element timeouts, which the image's nft must be able to make), in
      # a table of their own (the next start keeps it until it captures
      # again): no capture table, no policy rule; the capture address
      # stays on lo, labelled (captured flows' conntrack entries still
      # point at it; the next start replaces it).
      left=$(jail "$r" nft list table inet edge_relay 2>&1) || true
      grep -Eq 'dnat ip to|redirect to|chain (pre_nat|svc_pre)' <<<"$left" && die "$label: capture rules left after SIGTERM: $left"
      has '169\.254\.70\.1/32 .*lo:edge_relay' jail "$r" ip -4 addr show dev lo || die "$label: the capture address (label lo:edge_relay) is not kept on lo after SIGTERM"
      held=$(jail "$r" nft list table inet edge_relay_held 2>&1) || true
      grep -q 'chain held_fwd' <<<"$held" || { cat "$T/$label-edge.log" >&2; die "$label: no held refusals after SIGTERM (capture.hold_after_exit): $held"; }
      has '^7100:' jail "$r" ip rule show && die "$label: ip rule 7100 left after SIGTERM"
      say "$label: SIGTERM removed the capture, held its refusals" "edge exit 0, no capture rule or policy rule, the address kept; held_fwd/held_out in inet edge_relay_held"
    fi
    kill -TERM "$rpid"
    rc=0; wait "$rpid" || rc=$?
    [ "$rc" = 0 ] || { cat "$T/$label-relay.log" >&2; die "$label: relay-server exited $rc after SIGTERM"; }
  }

  printf '127.0.0.1\tlocalhost\n127.0.0.1\trelay.image-test\n' >"$T/hosts"

  # -- the image
  R=$T/mnt-image
  mount_root "$T/bundle/rootfs" "$R"
  run() { jail "$R" "$@"; }
  for b in relay-server edge-client; do
    v=$(run /usr/local/bin/$b --version) || die "image: $b --version failed"
    [ "$v" = "$b $TAG" ] || die "image: $b --version printed '$v', expected '$b $TAG'"
    say "image: $b --version" "$v"
  done
  run /usr/local/bin/relay-server route-agent --help >/dev/null || die "image: relay-server route-agent --help"
  if [ "${#EMU[@]}" != 0 ]; then
    # qemu-user cannot run nft or conntrack (see the top): their loader
    # must find every library in the image instead.
    for c in nft conntrack ip; do
      p=$(resolve "$R" "$c")
      v=$(run /lib/ld-linux-aarch64.so.1 --list "$p" 2>&1) || die "image: the loader cannot load $p: $v"
      grep -q 'not found' <<<"$v" && die "image: $p: libraries not found: $(grep 'not found' <<<"$v")"
      say "image: $p's libraries (ld-linux-aarch64.so.1 --list)" "$(grep -c '=>' <<<"$v") found, none missing"
    done
    v=$(run ip -V) || die "image: ip -V failed"
    say "image: ip -V (PATH, under qemu)" "$v"
    run ip link set lo up || die "image: ip link set lo up"
    run ip route add 10.99.0.0/24 dev lo || die "image: ip route add"
    has '^10.99.0.0/24 dev lo' run ip route show || die "image: ip route does not list the route it added"
    run ip route del 10.99.0.0/24 dev lo
    say "image: ip route add/show/del in the namespace (qemu)" "ok"
    say "image: nft, conntrack, capture session" "NOT RUN: qemu-user has no NETLINK_NETFILTER"
    session "$R" image false
  else
  # Native: nft, ip and conntrack run (not indented: the here-documents).
  v=$(run nft --version) || die "image: nft --version failed"
  say "image: nft --version (PATH)" "$v"
  v=$(run ip -V) || die "image: ip -V failed"
  say "image: ip -V (PATH)" "$v"
  # Capture runs `conntrack -D` when Service capture changes
  # (transport/src/capture/services.rs) and only logs a failure at debug
  # level: an image without it would look fine until a UDP flow stays on
  # its stale NAT binding.
  v=$(run conntrack --version 2>&1) || die "image: conntrack --version failed: $v"
  say "image: conntrack --version (PATH)" "$v"
  run ip link set lo up || die "image: ip link set lo up"
  run ip route add 10.99.0.0/24 dev lo || die "image: ip route add"
  has '^10.99.0.0/24 dev lo' run ip route show || die "image: ip route does not list the route it added"
  run ip route del 10.99.0.0/24 dev lo
  say "image: ip route add/show/del in the namespace" "ok"
  run nft list ruleset >/dev/null || die "image: nft list ruleset"
  run nft -f - <<'NFT' || die "image: nft -f (table with a counter rule)"
table inet image_check {
  chain out { type filter hook output priority 0; ip daddr 10.99.0.1 counter; }
}
NFT
  has 'table inet image_check' run nft list ruleset || die "image: nft list ruleset does not show the table it added"
  run nft delete table inet image_check
  [ -z "$(run nft list ruleset)" ] || die "image: ruleset not empty after delete"
  say "image: nft -f / list ruleset / delete table" "ok"
  # A UDP conntrack entry (a ct rule turns tracking on in this namespace;
  # the datagram comes from this script's bash, the image has no shell),
  # deleted by the image's conntrack with capture's arguments
  # (conntrack_delete_args: -D -p udp --orig-dst ADDR --dport PORT).
  run nft -f - <<'NFT' || die "image: nft -f (table with a ct rule)"
table inet image_ct {
  chain out { type filter hook output priority 0; ct state new counter; }
}
NFT
  echo probe >/dev/udp/127.0.0.1/5399 || die "image: sending a UDP datagram to 127.0.0.1:5399"
  has 'dport=5399' run conntrack -L -p udp --orig-dst 127.0.0.1 --dport 5399 2>/dev/null \
    || die "image: conntrack -L does not list the UDP entry to 127.0.0.1:5399"
  v=$(run conntrack -D -p udp --orig-dst 127.0.0.1 --dport 5399 2>&1) \
    || die "image: conntrack -D -p udp --orig-dst 127.0.0.1 --dport 5399 failed: $v"
  grep -q '1 flow entries have been deleted' <<<"$v" || die "image: conntrack -D: $v"
  has 'dport=5399' run conntrack -L -p udp --orig-dst 127.0.0.1 --dport 5399 2>/dev/null \
    && die "image: the UDP entry to 127.0.0.1:5399 is still listed after conntrack -D"
  run nft delete table inet image_ct
  [ -z "$(run nft list ruleset)" ] || die "image: ruleset not empty after deleting image_ct"
  say "image: conntrack -D -p udp --orig-dst --dport (capture's)" "1 entry made, listed, deleted"
  session "$R" image true
  fi # native

  # -- the bare root: static binaries and three /etc files, nothing else
  # (same namespace: lo is up, set by the image's ip above)
  R=$T/mnt-bare
  mount_root "$T/bare" "$R"
  if [ -e "$R/lib64/ld-linux-x86-64.so.2" ] || [ -e "$R/usr/lib/x86_64-linux-gnu/libc.so.6" ] \
     || [ -e "$R/lib/ld-linux-aarch64.so.1" ] || [ -e "$R/usr/lib/aarch64-linux-gnu/libc.so.6" ]; then
    die "bare root has a loader or libc"
  fi
  session "$R" bare false
  # A name not in /etc/hosts must not resolve (no DNS server in the
  # namespace): the check above could not pass by accident.
  timeout -s TERM 3 "${JAIL[@]}" "$R" "${EMU[@]}" /usr/local/bin/edge-client --config /etc/edge-relay/edge.toml \
    --relay relay.not-in-hosts.image-test:8443 >"$T/bare-missing.log" 2>&1 || true
  grep -q 'resolve relay.not-in-hosts.image-test:8443' "$T/bare-missing.log" \
    || { cat "$T/bare-missing.log" >&2; die "bare: a name absent from /etc/hosts did not fail to resolve"; }
  say "bare: a name absent from /etc/hosts" "fails: $(grep -o 'resolve relay.not-in-hosts[^"]*' "$T/bare-missing.log" | head -1 | cut -c1-60)"
  exit 0
fi

# ---- outside: unpack, check the config, then run the above in a namespace.
cd "$(dirname "$0")/../.."
LAYOUT=${1:-${IMAGE_OUT:-target/image}/oci}
[ "$(id -u)" = 0 ] || die "run as root (network namespace, mounts, chroot)"
for t in umoci jq ip unshare chroot curl; do command -v "$t" >/dev/null || die "$t is missing"; done
[ -f "$LAYOUT/index.json" ] || die "$LAYOUT is not an OCI layout: run deploy/image/build-oci.sh"
mapfile -t tags < <(sed -n 's/^ *newTag: *//p' deploy/kubernetes/overlays/*/kustomization.yaml | sort -u)
[ "${#tags[@]}" = 1 ] || die "overlays disagree on newTag: ${tags[*]:-none}"
TAG=${tags[0]}

T=$(mktemp -d /tmp/verify-oci.XXXXXX)
NS=edge-relay-image-$$
cleanup() {
  ip netns del "$NS" 2>/dev/null || true
  rm -rf "$T"
}
trap cleanup EXIT

# The image's architecture (its config), and how to run it here.
manifest=$(jq -r --arg t "$TAG" '.manifests[] | select(.annotations["org.opencontainers.image.ref.name"] == $t) | .digest' "$LAYOUT/index.json")
[ -n "$manifest" ] || die "$LAYOUT has no manifest tagged $TAG"
config=$(jq -r .config.digest "$LAYOUT/blobs/sha256/${manifest#sha256:}")
ARCH=$(jq -r .architecture "$LAYOUT/blobs/sha256/${config#sha256:}")
case $(uname -m) in x86_64) HOST_ARCH=amd64 ;; aarch64) HOST_ARCH=arm64 ;; *) HOST_ARCH=$(uname -m) ;; esac
EMU_NAME=
RUN_SKIP=
if [ "$ARCH" != "$HOST_ARCH" ]; then
  if [ "$ARCH" = arm64 ] && command -v qemu-aarch64-static >/dev/null; then
    EMU_NAME=qemu-aarch64-static
  else
    RUN_SKIP="a linux/$ARCH image on $HOST_ARCH and no qemu-aarch64-static (apt-get install qemu-user-static)"
  fi
fi

echo "== verify $LAYOUT:$TAG (linux/$ARCH${EMU_NAME:+, run under $EMU_NAME})"
umoci unpack --image "$LAYOUT:$TAG" "$T/bundle" >/dev/null || die "umoci unpack $LAYOUT:$TAG failed"
say "umoci unpack (digests checked)" "$(du -sh "$T/bundle/rootfs" | cut -f1) root filesystem"
cfg=$T/bundle/config.json
[ "$(jq -c .process.args "$cfg")" = '["/usr/local/bin/relay-server","--help"]' ] \
  || die "image CMD is $(jq -c .process.args "$cfg"), deploy/Containerfile's is [\"/usr/local/bin/relay-server\",\"--help\"]"
[ "$(jq .process.user.uid "$cfg")" = 0 ] || die "image user is not 0"
jq -r '.process.env[]' "$cfg" | grep '^PATH=.*:/usr/sbin:' >/dev/null || die "image PATH lacks /usr/sbin (nft)"
# Every command of the manifests is in the image.
mapfile -t cmds < <(sed -n 's/^ *command: \["\([^"]*\)".*/\1/p' deploy/kubernetes/base/*.yaml | sort -u)
[ "${#cmds[@]}" -gt 0 ] || die "no command: found in deploy/kubernetes/base"
for c in "${cmds[@]}"; do
  [ -x "$T/bundle/rootfs$c" ] || die "manifest command $c is not in the image"
done
say "config: user 0, PATH, CMD; manifests' commands present" "${cmds[*]}"

if [ -n "$RUN_SKIP" ]; then
  echo "   run checks (binaries, nft, ip, conntrack, sessions) SKIPPED: $RUN_SKIP"
  echo "== image unpacked and its config checked; nothing in it was run"
  exit 0
fi
[ -z "$EMU_NAME" ] || cp "$(command -v "$EMU_NAME")" "$T/$EMU_NAME"

mkdir -p "$T/bare/usr/local/bin" "$T/bare/etc/edge-relay" "$T"/bare/{proc,dev,tmp}
cp "$T/bundle/rootfs/usr/local/bin/"{relay-server,edge-client} "$T/bare/usr/local/bin/"
cp "$T/bundle/rootfs/etc/"{hosts,nsswitch.conf,resolv.conf} "$T/bare/etc/"

ip netns add "$NS"
IMG_PATH=$(jq -r '.process.env[] | select(startswith("PATH=")) | .[5:]' "$cfg")
ip netns exec "$NS" unshare --mount --propagation private "$(pwd)/deploy/image/verify-oci.sh" --inside "$T" "$TAG" "$IMG_PATH" "$EMU_NAME"
echo "== image verified"
