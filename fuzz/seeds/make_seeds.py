#!/usr/bin/env python3
"""Regenerates the committed seed corpus in fuzz/seeds/<target>/.

Message bodies are the golden encodings of protocol/tests/golden.rs; the
CONNECT heads are what kube-apiserver (Go), curl and a few broken clients
send; the configs are deploy/examples/*.toml and variants with every
section. Run from the repository root: python3 fuzz/seeds/make_seeds.py [target...]
(with targets, only their seeds are written).
"""
import os
import pathlib
import struct
import sys

ROOT = pathlib.Path(__file__).resolve().parents[2]
SEEDS = ROOT / "fuzz" / "seeds"

GOLDEN = {
    "client_hello": "0106656467652d3103000af407001800c0a8010a2001fd000000000000000000000000000000400100c0a8010a0303652f3102",
    "hello_accepted": "00fc04030201fb2c01027230fb8813fb204e01000a6000000c01",
    "hello_rejected": "0101026e6f0101fbe803",
    "control_ping": "0007",
    "control_pong": "01fb2c01",
    "control_route_update": "0201000a6000000c",
    "control_goaway": "0303627965fb3075",
    "control_route_delta": "040001000a6000000c01000af409001801",
    "control_keepalive": "09fb401f",
    "control_lan_overlaps": "0a0100c0a8000010",
    "control_served_routes": "0501000af40700180100c0a8010a",
    "control_service_delta": "060101000a60001450000101000af40705fb901f01000a60000a350101",
    "control_replicas": "070103722d310f3139382e31382e302e323a38343433",
    "control_service_names": "080103632e6c02026e73037765620001000a600014010468747470500000026e73026462010100fb38150101000af40705010464622d3001fb3915010161016201",
    "control_moving": "0b07",
    "control_capture_failing": "0c00036e6674",
    "control_capture_installed": "0c0100",
    "server_hello_ext": "01000af407001800",
    "hello_rejected_unknown_node": "0107000100",
    "cert_request": "010165017401aa",
    "cert_reply_issued": "000150fbe80307",
    "stream_open_addr": "00000af40705fb901f0101fd000000000000000000000000000001fb409c00",
    "stream_open_name": "0106656467652d31fb0a280000",
    "stream_open_udp": "00000af40705350001fc01000080",
    "stream_reply_ok": "0000",
    "stream_reply_denied": "040178",
}


ONLY = set(sys.argv[1:])


def put(target, name, data):
    if ONLY and target not in ONLY:
        return
    d = SEEDS / target
    d.mkdir(parents=True, exist_ok=True)
    (d / name).write_bytes(data)


def frame(body):
    return struct.pack(">I", len(body)) + body


bodies = {k: bytes.fromhex(v) for k, v in GOLDEN.items()}

# messages: raw bodies, one with appended fields (a newer peer), an unknown
# control kind, a datagram.
for k, b in bodies.items():
    put("messages", k, b)
put("messages", "control_ping_extra_fields", bodies["control_ping"] + b"\x07\x08")
# The first variant index past this build's (Control::VARIANTS = 13).
put("messages", "control_unknown_kind", b"\x0d\x01\x02\x03")
# An accepting reply followed by the extension, as a relay sends it to an
# edge that announced SERVED_ROUTES.
put("messages", "hello_accepted_with_ext", bodies["hello_accepted"] + bodies["server_hello_ext"])
put("messages", "datagram", b"\x80\x00\x00\x01hello")

# bincode (standard configuration): variable-length integers, strings and
# byte vectors behind their length.
def varint(n):
    if n < 251:
        return bytes([n])
    if n < 1 << 16:
        return b"\xfb" + struct.pack("<H", n)
    if n < 1 << 32:
        return b"\xfc" + struct.pack("<I", n)
    return b"\xfd" + struct.pack("<Q", n)


def blob(b):
    return varint(len(b)) + b


def text(t):
    return blob(t.encode())


def cert_request(version, node, token, public_key):
    return varint(version) + text(node) + text(token) + blob(public_key)


# P-256: SubjectPublicKeyInfo of the curve's generator point (a valid key).
P256_G = bytes.fromhex(
    "046b17d1f2e12c4247f8bce6e563a440f277037d812deb33a0f4a13945d898c296"
    "4fe342e2fe1a7f9b8ee7eb4a7c0f9e162bce33576b315ececbb6406837bf51f5"
)
P256_SPKI = bytes.fromhex("3059301306072a8648ce3d020106082a8648ce3d030107034200") + P256_G
assert len(P256_SPKI) == 91
# Ed25519: the public key of the private key 32 × 0x01 (RFC 8032 encoding).
ED25519_PUB = bytes.fromhex("8a88e3dd7409f195fd52db2d3cba5d72ca6709bf1d94121bf3748801b40f6f5c")
ED25519_SPKI = bytes.fromhex("302a300506032b6570032100") + ED25519_PUB

# bootstrap: CertRequest and CertReply bodies (one frame's worth).
put("bootstrap", "request_p256", cert_request(1, "edge-1", "token-edge-1", P256_SPKI))
put("bootstrap", "request_ed25519", cert_request(1, "edge-1", "token-edge-1", ED25519_SPKI))
put("bootstrap", "request_ip_node", cert_request(1, "10.0.0.1", "token-10.0.0.1", P256_SPKI))
put("bootstrap", "request_other_node", cert_request(1, "edge-1", "token-edge-2", P256_SPKI))
put("bootstrap", "request_bad_key", cert_request(1, "edge-1", "token-edge-1", b"\x01\x02\x03"))
put("bootstrap", "request_version_2", cert_request(2, "edge-1", "token-edge-1", P256_SPKI))
# Refused(Rejection { IdentityMismatch, "no", relay_version 1, retry_after_ms None }).
put("bootstrap", "reply_refused", b"\x01" + varint(1) + text("no") + varint(1) + b"\x00")
try:
    import datetime
    from cryptography import x509
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
    from cryptography.x509.oid import NameOID

    key = Ed25519PrivateKey.from_private_bytes(b"\x01" * 32)
    assert key.public_key().public_bytes(
        serialization.Encoding.Raw, serialization.PublicFormat.Raw
    ) == ED25519_PUB
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "edge-1")])
    t0 = datetime.datetime(2027, 1, 1, tzinfo=datetime.timezone.utc)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(1)
        .not_valid_before(t0)
        .not_valid_after(t0 + datetime.timedelta(hours=12))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName("edge-1")]), critical=False)
        .sign(key, None)
    )
    pem = cert.public_bytes(serialization.Encoding.PEM)
    t1 = int((t0 + datetime.timedelta(hours=12)).timestamp())
    put("bootstrap", "reply_issued", b"\x00" + blob(pem) + varint(t1) + varint(t1 - 12 * 3600))
except ImportError:
    print("cryptography not installed: bootstrap/reply_issued not written")

# stream_payloads: n, n chunk sizes, then the stream (2-byte big-endian
# length, payload; repeated).
def payload(p):
    return struct.pack(">H", len(p)) + p


put("stream_payloads", "split", b"\x02\x01\x03" + payload(b"abc") + payload(b"") + payload(b"hello"))
put("stream_payloads", "whole", b"\x00" + payload(b"dns answer") + payload(b"x" * 300))
put("stream_payloads", "partial_tail", b"\x01\x04" + payload(b"abc") + b"\x00\x10xy")
put("stream_payloads", "byte_by_byte", b"\x01\x01" + payload(bytes(range(40))))

# dns: queries as a pod's stub resolver sends them (id, RD, one question),
# and a few the resolver refuses.
def qname(name):
    out = b""
    for label in name.rstrip(".").split("."):
        out += bytes([len(label)]) + label.encode()
    return out + b"\x00"


def dns_query(name, qtype, flags=0x0100, qd=1, edns=False, ident=0x1234):
    ar = 1 if edns else 0
    m = struct.pack(">HHHHHH", ident, flags, qd, 0, 0, ar)
    for _ in range(qd):
        m += qname(name) + struct.pack(">HH", qtype, 1)
    if edns:
        # OPT: root name, type 41, UDP size 4096, no flags, no options.
        m += b"\x00" + struct.pack(">HHIH", 41, 4096, 0, 0)
    return m


A, AAAA, CNAME, SRV, ANY = 1, 28, 5, 33, 255
D = "cluster.local"
put("dns", "a_service", dns_query(f"web.shop.svc.{D}", A))
put("dns", "aaaa_service_edns", dns_query(f"web.shop.svc.{D}", AAAA, edns=True))
put("dns", "srv_port", dns_query(f"_http._tcp.web.shop.svc.{D}", SRV))
put("dns", "srv_service", dns_query(f"web.shop.svc.{D}", SRV))
put("dns", "srv_headless", dns_query(f"_pg._tcp.db.shop.svc.{D}", SRV, edns=True))
put("dns", "a_headless", dns_query(f"db.shop.svc.{D}", A))
put("dns", "a_endpoint_hostname", dns_query(f"db-0.db.shop.svc.{D}", A))
put("dns", "aaaa_endpoint_dashed", dns_query(f"fd00-244--6.db.shop.svc.{D}", AAAA))
put("dns", "external_name", dns_query(f"ext.kube-system.svc.{D}", A))
put("dns", "namespace_nodata", dns_query(f"shop.svc.{D}", ANY))
put("dns", "nxdomain", dns_query(f"nope.shop.svc.{D}", A))
put("dns", "pod_forwarded", dns_query(f"10-244-7-5.shop.pod.{D}", A))
put("dns", "outside_forwarded", dns_query("example.com", A))
put("dns", "response_dropped", dns_query(f"web.shop.svc.{D}", A, flags=0x8180))
put("dns", "opcode_notimp", dns_query(f"web.shop.svc.{D}", A, flags=0x1100))
put("dns", "two_questions", dns_query(f"web.shop.svc.{D}", A, qd=2))
put("dns", "truncated_question", dns_query(f"web.shop.svc.{D}", A)[:20])

# frame: 2-byte little-endian limit (0xffff: the protocol limit), then frames.
LIMIT = b"\xff\xff"
put("frame", "control_stream", LIMIT + b"".join(frame(bodies[k]) for k in bodies if k.startswith("control")))
put("frame", "hello", LIMIT + frame(bodies["client_hello"]))
put("frame", "stream_open_then_raw", LIMIT + frame(bodies["stream_open_addr"]) + b"raw bytes after the header")
put("frame", "small_limit", b"\x08\x00" + frame(bodies["client_hello"]))
put("frame", "oversized", LIMIT + b"\x00\x01\x00\x01")
put("frame", "truncated", LIMIT + b"\x00\x00\x00\x09\x01")

# connect_head: 2-byte little-endian limit offset (limit = 256 + n % 8192),
# then the bytes received.
MAX = struct.pack("<H", 8192 - 256)
heads = {
    "go_ip": b"CONNECT 10.244.7.5:10250 HTTP/1.1\r\nHost: 10.244.7.5:10250\r\nUser-Agent: Go-http-client/1.1\r\n\r\n",
    "go_node": b"CONNECT edge-1:10250 HTTP/1.1\r\nHost: edge-1:10250\r\nUser-Agent: Go-http-client/1.1\r\n\r\n",
    "curl_v6": b"CONNECT [fd00::1]:8080 HTTP/1.1\r\nHost: [fd00::1]:8080\r\nUser-Agent: curl/8.5.0\r\nProxy-Connection: Keep-Alive\r\n\r\n",
    "pipelined": b"CONNECT 192.168.1.10:22 HTTP/1.1\r\n\r\nSSH-2.0-OpenSSH_9.6\r\n",
    "get": b"GET /metrics HTTP/1.1\r\nHost: relay\r\n\r\n",
    "no_port": b"CONNECT edge-1 HTTP/1.1\r\n\r\n",
    "http10": b"CONNECT Edge-1.example:443 HTTP/1.0\r\n\r\n",
    "incomplete": b"CONNECT 10.0.0.1:80 HTTP/1.1\r\nHost: 10.0.0.1:80\r\n",
}
for k, h in heads.items():
    put("connect_head", k, MAX + h)
put("connect_head", "tight_limit", b"\x00\x00" + heads["go_ip"])
# The input of the first crash found (a signed port), limit 256 + 0x1f00 % 8192.
put("connect_head", "regression_signed_port", b"\x00\x1f" + b"CONNECT 2.18.1.10:+22 HTTP/1.1\r\n\r\n")

# configs (deploy/examples/relay.toml has [communities] already: a
# second one would be a duplicate table, refused by the parser).
relay = (ROOT / "deploy/examples/relay.toml").read_bytes()
edge = (ROOT / "deploy/examples/edge.toml").read_bytes()
put("relay_config", "example", relay)
put("relay_config", "minimal", b'[listen]\n[tls]\ncert = "c"\nkey = "k"\nclient_ca = "ca"\n')
put("relay_config", "every_section", b'config_version = 1\nhold_offline_routes = true\n' + relay
    .replace(b"[listen]\n", b"""[listen]
tcp_fallback = true
tcp_fallback_port = 443
tcp_fallback_mss = 1200
health = "127.0.0.1:9091"
connect_cloud = false
""")
    .replace(b"[tls]\n", b'[tls]\ncrl = "/crl.pem"\nreload_interval = "30s"\n')
    .replace(b"[admin]\n", b"""[admin]
token_file = "/t"
read_token_file = "/r"
tls = true
cert = "/admin.pem"
key = "/admin-key.pem"
""")
    .replace(b"[quic]\n", b"""[quic]
max_udp_payload = 1452
initial_mtu = 1200
conn_window = 16777216
stream_idle_timeout = "10m"
""")
    .replace(b"[limits]\n", b"""[limits]
dial_timeout = "5s"
udp_idle_timeout = "60s"
max_udp_flows_per_session = 4096
""") + b"""
[connect_tls]
cert = "c"
key = "k"
client_ca = "ca"

[capture]
enabled = true
port = 15001
redirect_address = "169.254.70.2"
nft_table = "edge_relay"
route_table = 4242
rule_pref = 4242
mark = 4242
sources = ["10.244.0.0/16"]
node_port_addresses = ["192.168.0.0/16"]
max_connections = 1000
preserve_source = ["10.244.0.0/16"]
preserve_source_served = true
hold_after_exit = "30s"

[replicas]
advertise = "203.0.113.10:8443"

[[replicas.peers]]
id = "relay-b"
address = "203.0.113.11:8443"
""")
# In-cluster: [kubernetes] instead of [nodes], with certificate bootstrap
# and replicas found through Leases.
put("relay_config", "kubernetes", b"""relay_id = "relay-a"
tunnel_routes = ["10.244.0.0/16", "10.96.0.0/12"]

[listen]
quic = "0.0.0.0:8443"
connect = "127.0.0.1:8131"
admin = "127.0.0.1:9090"

[tls]
cert = "c"
key = "k"
client_ca = "ca"

[kubernetes]
enabled = true
kubeconfig = "/etc/edge-relay/kubeconfig"
context = "edge"
node_status = true
events = false
api_timeout = "10s"
services = true
cluster_domain = "Cluster.Local."
cache_file = "/var/lib/edge-relay/nodes.json"
services_cache_file = "/var/lib/edge-relay/services.json"
edge_address_ranges = ["192.168.0.0/16", "fd00::/8"]
node_name = "cloud-1"

[bootstrap]
ca_cert = "/issuer/ca.pem"
ca_key = "/issuer/ca-key.pem"
cert_lifetime = "12h"
service_account = "edge-relay/edge-client"
daemonset = ["edge-client", "edge-client-arm"]

[replicas]
advertise = "203.0.113.10:8443"
lease_namespace = "edge-relay"
lease_duration = "15s"
renew_every = "5s"
skew_margin = "2s"
gc_after = "1h"
""")
put("edge_config", "example", edge)
put("edge_config", "minimal", b'node = "n"\nrelay = "r:1"\n[tls]\ncert = "c"\nkey = "k"\nrelay_ca = "ca"\n')
put("edge_config", "every_section", b"""config_version = 1
transport = "tcp"
tcp_fallback_mss = 1200
tcp_fallback_port = 443
tcp_proxy = "http://user:p%40ss@proxy.site:3128"
max_relays = 4
worker_threads = 2
kube_proxy = false
status_listen = "127.0.0.1:9469"
capture_state_file = "/var/lib/edge-relay/capture.json"
relay_addrs_file = "/var/lib/edge-relay/relay-addrs.json"
""" + edge
    .replace(b"[timeouts]\n", b"""[timeouts]
udp_idle = "60s"
quic_fallback = "3s"
quic_probe = "5m"
""")
    .replace(b"[backoff]\n", b"""[backoff]
long_after = "10m"
long_max = "5m"
""") + b"""max_streams = 10000
stream_window = 1048576
max_udp_payload = 1452
initial_mtu = 1200

[capture]
enabled = true
port = 15001
sources = ["10.244.7.0/24"]
max_udp_flows = 1024
preserve_source = ["10.244.7.0/24"]
hold_after_exit = "30s"

[dns]
enabled = true
listen = "169.254.20.10:53"
upstream = "10.96.0.10:53"
cluster_domain = "cluster.local"
state_file = "/var/lib/edge-relay/dns-names.json"
forward_timeout = "2s"
max_forwards = 256
""")
# Certificate bootstrap: no tls.cert / tls.key.
put("edge_config", "bootstrap", b"""node = "edge-1"
relay = "[2001:db8::1]:8443"
routes = ["10.244.7.0/24", "fd00:7::/64"]

[tls]
relay_ca = "/etc/edge-relay/certs/ca.pem"

[bootstrap]
token_file = "/var/run/secrets/edge-relay/token"
state_dir = "/var/lib/edge-relay"

[dns]
enabled = true
upstream = "[fd00:96::a]:53"
""")

# tcp_datagrams: byte 0 (bits 0-6: the stream cut into yamux data frames
# of that many bytes, 0 for one frame; bit 7: ended by a reset, not a
# FIN), then the datagram stream as an edge sends it: the mark 0x44, then
# datagrams behind their 2-byte big-endian length, each a 4-byte flow id
# and the payload. The target's relay has flows 1, 2 and 0x80000001.
MARK = b"\x44"


def dgram(flow, p):
    d = struct.pack(">I", flow) + p
    return struct.pack(">H", len(d)) + d


DGRAMS = dgram(1, b"dns query") + dgram(0x80000001, b"x" * 100) + dgram(2, b"")
put("tcp_datagrams", "whole", b"\x00" + MARK + DGRAMS)
put("tcp_datagrams", "byte_frames", b"\x01" + MARK + DGRAMS)
put("tcp_datagrams", "reset_frames_of_5", b"\x85" + MARK + DGRAMS)
# Unknown flow, a datagram too short for a flow id, an empty one, then a
# truncated last datagram.
put("tcp_datagrams", "unknown_short_truncated",
    b"\x00" + MARK + dgram(7, b"nobody") + b"\x00\x03abc" + b"\x00\x00" + dgram(1, b"ok") + b"\x00\x10abc")
# A length of 65,535 with 3 bytes behind it: the reader's largest buffer.
put("tcp_datagrams", "largest_length_truncated", b"\x00" + MARK + dgram(1, b"a") + b"\xff\xffabc")
# 300 to one flow: past its queue of 256 (drops counted as queue full).
put("tcp_datagrams", "flow_queue_overflow", b"\x00" + MARK + dgram(2, b"") * 300)
# 1,100 datagrams (empty ones, then 8 for flow 1): past the connection's
# queue of 1,024, where the reader may drop without counting.
put("tcp_datagrams", "connection_queue_overflow", b"\x00" + MARK + b"\x00\x00" * 1092 + dgram(1, b"late") * 8)
put("tcp_datagrams", "no_mark", b"\x00" + dgram(1, b"dns query"))
put("tcp_datagrams", "mark_only", b"\x00" + MARK)
put("tcp_datagrams", "empty_stream", b"\x00")

# proxy_answer: what an HTTP proxy answers the edge's CONNECT (squid,
# tinyproxy, corporate proxies; refusals; broken ones), and what follows.
TLS_START = b"\x16\x03\x03\x00\x7a\x02\x00\x00\x76\x03\x03"
answers = {
    "squid_200": b"HTTP/1.1 200 Connection established\r\n\r\n",
    "200_then_tls": b"HTTP/1.1 200 Connection established\r\nProxy-agent: tinyproxy/1.11.1\r\n\r\n" + TLS_START,
    "http10_200": b"HTTP/1.0 200 Connection established\r\n\r\n",
    "407": b"HTTP/1.1 407 Proxy Authentication Required\r\nProxy-Authenticate: Basic realm=\"corp\"\r\nContent-Length: 5\r\n\r\nnope!",
    "403_squid": b"HTTP/1.1 403 Forbidden\r\nServer: squid/6.6\r\nMime-Version: 1.0\r\nContent-Type: text/html\r\nX-Squid-Error: ERR_ACCESS_DENIED 0\r\nConnection: close\r\n\r\n<html>denied</html>",
    "502": b"HTTP/1.1 502 Bad Gateway\r\n\r\n",
    "100_then_200": b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK\r\n\r\n",
    "lf_only": b"HTTP/1.1 200 OK\n\n",
    "truncated": b"HTTP/1.1 200 Conn",
    "signed_code": b"HTTP/1.1 +200 OK\r\n\r\n",
    "no_reason": b"HTTP/1.1 204\r\n\r\n",
    "not_utf8": b"HTTP/1.1 200 \xff\xfe\r\nX: \xc3\x28\r\n\r\n",
    "empty": b"",
    # A header past the 8 KiB bound (also makes libFuzzer's inputs this long).
    "over_8k": b"HTTP/1.1 200 OK\r\nX-Pad: " + b"a" * 8200 + b"\r\n\r\n",
}
for k, a in answers.items():
    put("proxy_answer", k, a)
