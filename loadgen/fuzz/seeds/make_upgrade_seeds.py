#!/usr/bin/env python3
"""Writes fuzz/seeds/upgrade_response/: inputs for the `upgrade_response` target's raw half (an
even first byte picks the request key `sec_websocket_key(byte)`, the rest is the response head)
that carry that key's correct `Sec-WebSocket-Accept`, so the fuzzer starts from heads the check
accepts and mutates them, instead of almost never finding a valid accept key on its own.
Run from loadgen/: python3 fuzz/seeds/make_upgrade_seeds.py"""
import base64, hashlib, os

M = (1 << 64) - 1
GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"


def splitmix64(z):
    z = (z + 0x9E3779B97F4A7C15) & M
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & M
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & M
    return z ^ (z >> 31)


def key(seed):
    a = splitmix64(seed)
    b = splitmix64(a)
    return base64.b64encode(a.to_bytes(8, "little") + b.to_bytes(8, "little"))


def accept(k):
    return base64.b64encode(hashlib.sha1(k + GUID).digest())


heads = [
    b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Accept: %s\r\n\r\n",
    b"HTTP/1.1 101 X\r\nsec-websocket-accept: %s\r\nupgrade: websocket\r\nconnection: upgrade\r\n\r\n",
    b"HTTP/1.1 101 Switching Protocols\r\nServer: switchboard\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Accept: %s\r\nX-Extra: 1\r\n\r\n\x82\x05hello",
]
out = "fuzz/seeds/upgrade_response"
os.makedirs(out, exist_ok=True)
for seed in (0, 2, 200):
    for i, h in enumerate(heads):
        with open(f"{out}/seed{seed}-head{i}", "wb") as f:
            f.write(bytes([seed]) + h % accept(key(seed)))
