"""A raw-socket ceiling for fan-out, as a comparison for ``gateway bench``.

No framework: an epoll loop reads a publisher's bytes and writes each read's
whole lines to every other client with one blocking ``sendall`` (up to 64 KiB
at a time), and to every UDP peer with one ``sendto`` per line (Python has no
``sendmmsg``). Nothing is parsed, limited or counted: no real server can be
this simple, so it bounds what any Python server on this machine can reach.

Usage: ``python -m tests.perf.raw_server TCP_PORT [UDP_PORT]``.
"""

from __future__ import annotations

import contextlib
import select
import socket
import sys


def main() -> None:
    tcp_port = int(sys.argv[1])
    udp_port = int(sys.argv[2]) if len(sys.argv) > 2 else 0
    listener = socket.socket()
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listener.bind(("127.0.0.1", tcp_port))
    listener.listen(4096)
    listener.setblocking(False)
    epoll = select.epoll()
    epoll.register(listener.fileno(), select.EPOLLIN)
    udp = None
    if udp_port:
        udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        udp.bind(("127.0.0.1", udp_port))
        udp.setblocking(False)
        udp.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4 << 20)
        epoll.register(udp.fileno(), select.EPOLLIN)
    clients: dict[int, socket.socket] = {}
    peers: dict[tuple[str, int], None] = {}
    rests: dict[int, bytes] = {}
    print(f"listening tcp 127.0.0.1:{tcp_port}", flush=True)
    while True:
        for fd, _ in epoll.poll():
            if fd == listener.fileno():
                while True:
                    try:
                        conn, _addr = listener.accept()
                    except BlockingIOError:
                        break
                    conn.setblocking(True)  # reads only after EPOLLIN; writes block
                    conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                    clients[conn.fileno()] = conn
                    epoll.register(conn.fileno(), select.EPOLLIN)
                continue
            if udp is not None and fd == udp.fileno():
                while True:
                    try:
                        _data, addr = udp.recvfrom(65536)
                    except BlockingIOError:
                        break
                    peers[addr] = None
                continue
            conn = clients[fd]
            try:
                data = conn.recv(65536)
            except ConnectionError:
                data = b""
            if not data:
                epoll.unregister(fd)
                del clients[fd]
                rests.pop(fd, None)
                conn.close()
                continue
            data = rests.pop(fd, b"") + data
            end = data.rfind(b"\n") + 1
            if end < len(data):
                rests[fd] = data[end:]
            if not end:
                continue
            chunk = data[:end]
            for other_fd, other in list(clients.items()):
                if other_fd != fd:
                    with contextlib.suppress(OSError):
                        other.sendall(chunk)
            if peers and udp is not None:
                lines = chunk.split(b"\n")
                lines.pop()
                for addr in peers:
                    for line in lines:
                        with contextlib.suppress(OSError):
                            udp.sendto(line + b"\n", addr)


if __name__ == "__main__":
    main()
