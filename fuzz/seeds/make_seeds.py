#!/usr/bin/env python3
"""Regenerates the committed seed corpus in fuzz/seeds/<target>/.

Message bodies are the golden encodings of protocol/tests/golden.rs; the
CONNECT heads are what kube-apiserver (Go), curl and a few broken clients
send; the configs are deploy/examples/*.toml and variants with every
section. Run from the repository root: python3 fuzz/seeds/make_seeds.py
"""
import os
import pathlib
import struct

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
    "stream_open_addr": "00000af40705fb901f0101fd000000000000000000000000000001fb409c00",
    "stream_open_name": "0106656467652d31fb0a280000",
    "stream_open_udp": "00000af40705350001fc01000080",
    "stream_reply_ok": "0000",
    "stream_reply_denied": "040178",
}


def put(target, name, data):
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
put("messages", "control_unknown_kind", b"\x0b\x01\x02\x03")
put("messages", "datagram", b"\x80\x00\x00\x01hello")

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

# configs.
relay = (ROOT / "deploy/examples/relay.toml").read_bytes()
edge = (ROOT / "deploy/examples/edge.toml").read_bytes()
put("relay_config", "example", relay)
put("relay_config", "minimal", b'[listen]\n[tls]\ncert = "c"\nkey = "k"\nclient_ca = "ca"\n')
put("relay_config", "every_section", relay.replace(b"[admin]\n", b'[admin]\ntoken_file = "/t"\n') + b"""
[connect_tls]
cert = "c"
key = "k"
client_ca = "ca"

[communities]
site-a = ["edge-1", "edge-2"]
all = ["*"]

[capture]
enabled = true
port = 15001
nft_table = "edge_relay"
route_table = 4242
rule_pref = 4242
mark = 4242
""")
put("edge_config", "example", edge)
put("edge_config", "minimal", b'node = "n"\nrelay = "r:1"\n[tls]\ncert = "c"\nkey = "k"\nrelay_ca = "ca"\n')
put("edge_config", "every_section", b'transport = "tcp"\n' + edge + b"""max_streams = 10000
stream_window = 1048576
max_udp_payload = 1452
initial_mtu = 1200

[capture]
enabled = true
port = 15001
""")
