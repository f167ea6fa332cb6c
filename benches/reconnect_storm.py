#!/usr/bin/env python3
"""Reconnect storm against a running wsfan (loopback only), to measure what its log lines cost.

Usage: python3 benches/reconnect_storm.py PORT CLIENTS ROUNDS WSFAN_PID
Each round opens CLIENTS WebSocket upgrades, waits for every 101, then drops them all.
Prints wall time and the CPU wsfan spent (from /proc/PID/stat). Compare --log-level info
with warn, stderr to a pipe (| cat > file) and to /dev/null. Keep CLIENTS under the
open-files limit (ulimit -n).
"""
import socket, sys, time, os
port=int(sys.argv[1]); n=int(sys.argv[2]); rounds=int(sys.argv[3]); pid=int(sys.argv[4])
req=(b"GET /ws/storm HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
     b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n")
def cpu():
    f=open(f"/proc/{pid}/stat").read().split(")")[1].split()
    return (int(f[11])+int(f[12]))/os.sysconf("SC_CLK_TCK")
c0=cpu(); t0=time.time()
for r in range(rounds):
    socks=[]
    for i in range(n):
        s=socket.create_connection(("127.0.0.1",port)); s.sendall(req); socks.append(s)
    for s in socks:
        buf=b""
        while b"\r\n\r\n" not in buf: buf+=s.recv(4096)
        assert buf.startswith(b"HTTP/1.1 101"), buf
    for s in socks: s.close()
time.sleep(1.0)
print(f"{n*rounds} connects+drops: wall {time.time()-t0:.2f}s, wsfan cpu {cpu()-c0:.3f}s")
