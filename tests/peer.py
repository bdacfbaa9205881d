#!/usr/bin/env python3
"""Traffic peer for the end-to-end tests: run inside a network namespace.

Protocol: the client sends N bytes and shuts down its write side; the server reads to
EOF, answers with M bytes and closes. Both byte counts are known exactly.
"""
import argparse
import socket
import struct
import sys
import threading


def recv_all(conn):
    total = 0
    while True:
        chunk = conn.recv(65536)
        if not chunk:
            return total
        total += len(chunk)


def serve(args):
    family = socket.AF_INET6 if ":" in args.addr else socket.AF_INET
    listener = socket.socket(family, socket.SOCK_STREAM)
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listener.bind((args.addr, args.port))
    listener.listen(1024)
    print("listening", flush=True)

    def handle(conn):
        with conn:
            if args.close_first:
                # The server's FIN goes first: answer, close, never read.
                conn.sendall(b"s" * args.reply)
                return
            recv_all(conn)
            if args.reset:
                # SO_LINGER {on, 0}: close() aborts with a RST instead of a FIN.
                conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                return
            conn.sendall(b"s" * args.reply)

    while True:
        conn, _ = listener.accept()
        threading.Thread(target=handle, args=(conn,), daemon=True).start()


def scan(args):
    """One connect to each port of a range; prints how many were refused."""
    first, last = map(int, args.ports.split("-"))
    refused = 0
    for port in range(first, last + 1):
        conn = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        try:
            conn.connect((args.addr, port))
        except ConnectionRefusedError:
            refused += 1
        finally:
            conn.close()
    print(f"refused {refused}", flush=True)


def hold_all(args):
    """Opens --count connections at once, sends --send bytes on each, prints 'held',
    waits for a line on stdin, then closes them all in order (client FIN first)."""
    conns = []
    for _ in range(args.count):
        conn = socket.create_connection((args.addr, args.port), timeout=args.timeout)
        conn.sendall(b"c" * args.send)
        conns.append(conn)
    print("held", flush=True)
    sys.stdin.readline()
    got = 0
    for conn in conns:
        conn.shutdown(socket.SHUT_WR)
        got += recv_all(conn)
        conn.close()
    print(f"received {got}", flush=True)


def connect(args):
    if args.ports:
        return scan(args)
    if args.hold_all:
        return hold_all(args)
    family = socket.AF_INET6 if ":" in args.addr else socket.AF_INET
    for _ in range(args.count):
        conn = socket.socket(family, socket.SOCK_STREAM)
        conn.settimeout(args.timeout)
        if args.source:
            if args.source_port:
                # Several sockets on one local port, towards different servers, as
                # connect() itself does when it reuses an ephemeral port.
                conn.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            conn.bind((args.source, args.source_port))
        if args.keepalive:
            # Probes every N seconds while idle: packets that change neither end's
            # counters but are the server's latest activity.
            conn.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE, args.keepalive)
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPINTVL, args.keepalive)
        try:
            conn.connect((args.addr, args.port))
        except OSError as e:
            print(f"connect failed: {e}", flush=True)
            conn.close()
            continue
        with conn:
            if args.hold:
                conn.sendall(b"c" * args.before)
                print("connected", flush=True)
                sys.stdin.readline()
            if args.read_first:
                # The server closes first; our FIN follows its.
                print(f"received {recv_all(conn)}", flush=True)
                continue
            conn.sendall(b"c" * args.send)
            if args.abort:
                # SO_LINGER {on, 0}: close() aborts with a RST from the client's side.
                conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                print("aborted", flush=True)
                continue
            if args.pause_after_send:
                print("sent", flush=True)
                sys.stdin.readline()
            conn.shutdown(socket.SHUT_WR)
            try:
                got = recv_all(conn)
            except ConnectionResetError:
                got = "reset"
            print(f"received {got}", flush=True)


def udp_serve(args):
    """An unconnected UDP server (as DNS servers are): answers each datagram with
    --reply bytes, to whoever sent it."""
    family = socket.AF_INET6 if ":" in args.addr else socket.AF_INET
    s = socket.socket(family, socket.SOCK_DGRAM)
    s.bind((args.addr, args.port))
    print("listening", flush=True)
    while True:
        _, peer = s.recvfrom(65536)
        if args.reply:
            s.sendto(b"r" * args.reply, peer)


def udp_query(args):
    """--count queries of --send bytes, each waiting for its answer: from one connected
    socket (a resolver's), or with --unconnected from sendto()/recvfrom() on an
    unconnected socket. Prints the bytes answered."""
    family = socket.AF_INET6 if ":" in args.addr else socket.AF_INET
    s = socket.socket(family, socket.SOCK_DGRAM)
    s.settimeout(args.timeout)
    if not args.unconnected:
        s.connect((args.addr, args.port))
    answered = 0
    for _ in range(args.count):
        if args.unconnected:
            s.sendto(b"q" * args.send, (args.addr, args.port))
            answered += len(s.recvfrom(65536)[0])
        else:
            s.send(b"q" * args.send)
            answered += len(s.recv(65536))
    s.close()
    print(f"answered {answered}", flush=True)


def main():
    parser = argparse.ArgumentParser()
    sub = parser.add_subparsers(dest="mode", required=True)
    # Every mode talks to (or listens on) one address and port.
    endpoint = argparse.ArgumentParser(add_help=False)
    endpoint.add_argument("--addr", required=True)
    endpoint.add_argument("--port", type=int, required=True)
    s = sub.add_parser("serve", parents=[endpoint])
    s.add_argument("--reply", type=int, default=0)
    s.add_argument("--reset", action="store_true")
    s.add_argument("--close-first", action="store_true",
                   help="send --reply bytes and close at once, without reading")
    c = sub.add_parser("connect", parents=[endpoint])
    c.add_argument("--send", type=int, default=0)
    c.add_argument("--count", type=int, default=1)
    c.add_argument("--timeout", type=float, default=10.0)
    c.add_argument("--hold", action="store_true",
                   help="send --before bytes, print 'connected', wait for a line on stdin")
    c.add_argument("--before", type=int, default=0)
    c.add_argument("--source", help="local address to connect from")
    c.add_argument("--source-port", type=int, default=0, help="local port to connect from (with --source)")
    c.add_argument("--keepalive", type=int, default=0, help="TCP keepalive probes every N seconds")
    c.add_argument("--hold-all", action="store_true",
                   help="open --count connections at once and hold them until a line on stdin")
    c.add_argument("--ports", help="FIRST-LAST: one connect to each port (a scan)")
    c.add_argument("--read-first", action="store_true",
                   help="send nothing, read until the server closes, then close")
    c.add_argument("--abort", action="store_true",
                   help="send --send bytes, then close with a RST")
    c.add_argument("--pause-after-send", action="store_true",
                   help="after sending, print 'sent' and wait for a line before closing")
    u = sub.add_parser("udp-serve", parents=[endpoint])
    u.add_argument("--reply", type=int, default=0)
    q = sub.add_parser("udp-query", parents=[endpoint])
    q.add_argument("--send", type=int, default=1)
    q.add_argument("--count", type=int, default=1)
    q.add_argument("--timeout", type=float, default=10.0)
    q.add_argument("--unconnected", action="store_true")
    args = parser.parse_args()
    {"serve": serve, "connect": connect, "udp-serve": udp_serve, "udp-query": udp_query}[args.mode](args)


if __name__ == "__main__":
    main()
