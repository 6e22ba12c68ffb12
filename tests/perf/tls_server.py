"""A TLS ceiling for fan-out, as a comparison for ``gateway bench`` (tls://, wss://).

No framework beyond pyOpenSSL: an epoll loop reads a plain-TCP publisher and
hands each read's whole lines, framed once, to every TLS receiver with ONE
``Connection.send`` (one ``SSL_write``) per receiver. Receivers on the TLS port
get the lines as they are; receivers on the WSS port (after the HTTP upgrade)
get each line as an unmasked WebSocket text frame. The TLS layer works on memory
BIOs, as Twisted's does, so a batch's ciphertext leaves in one ``send`` (a socket
BIO would make one syscall per 16 KiB record). What a receiver's socket does not
take waits in its own buffer, bounded: past ``PENDING_LIMIT`` the receiver is
dropped. Nothing else is parsed, limited or counted, so it bounds what a
Python TLS server on this machine can reach.

Usage: ``python -m tests.perf.tls_server TLS_PORT WSS_PORT PUB_PORT CERT KEY``.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import select
import socket
import struct
import sys
from pathlib import Path

from OpenSSL import SSL

PENDING_LIMIT = 16 << 20
SSL_MODE_ENABLE_PARTIAL_WRITE = 0x1  # openssl/ssl.h; pyOpenSSL sets it, exports no name
WS_GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
IN, OUT = select.EPOLLIN, select.EPOLLIN | select.EPOLLOUT


class Receiver:
    """One TLS (or WebSocket over TLS) receiver: handshake, upgrade, then writes."""

    __slots__ = ("conn", "fd", "handshaken", "out", "ready", "request", "sock", "websocket")

    def __init__(self, sock: socket.socket, conn: SSL.Connection, websocket: bool) -> None:
        self.sock = sock
        self.conn = conn  # on memory BIOs: the ciphertext of a batch leaves in one send
        self.fd = sock.fileno()
        self.websocket = websocket
        self.ready = False
        self.handshaken = False
        self.request = b""
        self.out = b""  # ciphertext the socket has not taken yet


def websocket_frames(chunk: bytes) -> bytes:
    """Each line of ``chunk`` (newline-terminated lines) as an unmasked text frame."""
    lines = chunk.split(b"\n")
    lines.pop()
    out = []
    for line in lines:
        length = len(line)
        if length < 126:
            out.append(struct.pack("!BB", 0x81, length))
        elif length < 65536:
            out.append(struct.pack("!BBH", 0x81, 126, length))
        else:
            out.append(struct.pack("!BBQ", 0x81, 127, length))
        out.append(line)
    return b"".join(out)


def upgrade_answer(request: bytes) -> bytes | None:
    """The 101 answer to a WebSocket opening handshake (None: no key in it)."""
    for line in request.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"sec-websocket-key":
            accept = base64.b64encode(hashlib.sha1(value.strip() + WS_GUID).digest())
            return (
                b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n"
                b"Connection: Upgrade\r\nSec-WebSocket-Accept: " + accept + b"\r\n\r\n"
            )
    return None


def listen(port: int) -> socket.socket:
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", port))
    sock.listen(4096)
    sock.setblocking(False)
    return sock


def server_context(cert: Path, key: Path) -> SSL.Context:
    for path in (cert, key):
        if not path.exists():
            sys.exit(f"tls_server: {path} does not exist (the gateway's dev certificate)")
    context = SSL.Context(SSL.TLS_SERVER_METHOD)
    context.set_min_proto_version(SSL.TLS1_2_VERSION)
    context.use_certificate_chain_file(str(cert))
    context.use_privatekey_file(str(key))
    context.check_privatekey()
    # With partial writes on, SSL_write stops after each 16 KiB record; off, it writes the
    # whole batch into the memory BIO in one call.
    context.clear_mode(SSL_MODE_ENABLE_PARTIAL_WRITE)
    # wss clients (browsers, gateway bench) offer ALPN: answer it as a web server would.
    context.set_alpn_select_callback(lambda _conn, offered: b"http/1.1")
    return context


class Server:
    def __init__(self, context: SSL.Context, tls: int, wss: int, pub: int) -> None:
        self.context = context
        self.epoll = select.epoll()
        self.listeners: dict[int, tuple[socket.socket, str]] = {}
        for port, kind in ((tls, "tls"), (wss, "wss"), (pub, "pub")):
            sock = listen(port)
            self.listeners[sock.fileno()] = (sock, kind)
            self.epoll.register(sock.fileno(), IN)
        self.publishers: dict[int, socket.socket] = {}
        self.rests: dict[int, bytes] = {}
        self.receivers: dict[int, Receiver] = {}

    def run(self) -> None:
        while True:
            for fd, events in self.epoll.poll():
                if fd in self.listeners:
                    self.accept(*self.listeners[fd])
                elif fd in self.publishers:
                    self.publisher_readable(fd)
                elif fd in self.receivers:
                    self.receiver_event(self.receivers[fd], events)

    def accept(self, listener: socket.socket, kind: str) -> None:
        while True:
            try:
                sock, _addr = listener.accept()
            except BlockingIOError:
                return
            sock.setblocking(False)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            if kind == "pub":
                self.publishers[sock.fileno()] = sock
                self.epoll.register(sock.fileno(), IN)
                continue
            conn = SSL.Connection(self.context, None)
            conn.set_accept_state()
            receiver = Receiver(sock, conn, websocket=kind == "wss")
            self.receivers[receiver.fd] = receiver
            self.epoll.register(receiver.fd, IN)

    # Publishers: plain TCP, each read's whole lines forwarded

    def publisher_readable(self, fd: int) -> None:
        sock = self.publishers[fd]
        try:
            data = sock.recv(65536)
        except BlockingIOError:
            return
        except ConnectionError:
            data = b""
        if not data:
            self.epoll.unregister(fd)
            del self.publishers[fd]
            self.rests.pop(fd, None)
            sock.close()
            return
        data = self.rests.pop(fd, b"") + data
        end = data.rfind(b"\n") + 1
        if end < len(data):
            self.rests[fd] = data[end:]
        if end:
            self.broadcast(data[:end])

    def broadcast(self, chunk: bytes) -> None:
        frames: bytes | None = None
        for receiver in list(self.receivers.values()):
            if not receiver.ready:
                continue
            if receiver.websocket:
                if frames is None:
                    frames = websocket_frames(chunk)
                self.write(receiver, frames)
            else:
                self.write(receiver, chunk)

    # Receivers

    def write(self, receiver: Receiver, batch: bytes) -> None:
        """One SSL_write of ``batch``, then its ciphertext to the socket."""
        try:
            sent = receiver.conn.send(batch)
            while sent < len(batch):  # not with partial writes off: a memory BIO takes all
                batch = batch[sent:]
                sent = receiver.conn.send(batch)
        except SSL.Error:
            self.drop(receiver)
            return
        self.send_out(receiver)

    def send_out(self, receiver: Receiver) -> None:
        """Move the TLS layer's ciphertext to the socket; keep what it does not take (bounded)."""
        chunks = [receiver.out] if receiver.out else []
        while True:
            try:
                chunks.append(receiver.conn.bio_read(1 << 20))
            except SSL.WantReadError:
                break
        out = b"".join(chunks)
        if not out:
            return
        waiting = bool(receiver.out)
        if not waiting:
            try:
                out = out[receiver.sock.send(out) :]
            except BlockingIOError:
                pass
            except OSError:
                self.drop(receiver)
                return
        receiver.out = out
        if len(out) > PENDING_LIMIT:
            self.drop(receiver)
        elif out and not waiting:
            self.epoll.modify(receiver.fd, OUT)

    def flush(self, receiver: Receiver) -> None:
        try:
            sent = receiver.sock.send(receiver.out)
        except BlockingIOError:
            return
        except OSError:
            self.drop(receiver)
            return
        receiver.out = receiver.out[sent:]
        if not receiver.out:
            self.epoll.modify(receiver.fd, IN)

    def receiver_event(self, receiver: Receiver, events: int) -> None:
        if events & select.EPOLLOUT and receiver.out:
            self.flush(receiver)
        if events & (select.EPOLLIN | select.EPOLLERR | select.EPOLLHUP):
            self.receiver_readable(receiver)

    def receiver_readable(self, receiver: Receiver) -> None:
        """Feed what arrived to the TLS layer: the handshake, the upgrade request, then
        nothing but the receiver's close."""
        try:
            data = receiver.sock.recv(65536)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if not data:
            self.drop(receiver)
            return
        conn = receiver.conn
        conn.bio_write(data)
        if not receiver.handshaken:
            try:
                conn.do_handshake()
            except SSL.WantReadError:
                self.send_out(receiver)
                return
            except SSL.Error:
                self.drop(receiver)
                return
            receiver.handshaken = True
            receiver.ready = not receiver.websocket
        while receiver.fd in self.receivers:
            try:
                text = conn.recv(65536)
            except SSL.WantReadError:
                break
            except SSL.Error:  # ZeroReturnError (close_notify) among them
                self.drop(receiver)
                return
            if receiver.websocket and not receiver.ready:
                self.upgrade(receiver, text)
        if receiver.fd in self.receivers:
            self.send_out(receiver)  # handshake records, session tickets

    def upgrade(self, receiver: Receiver, data: bytes) -> None:
        receiver.request += data
        head, sep, _ = receiver.request.partition(b"\r\n\r\n")
        if not sep:
            if len(receiver.request) > 16384:
                self.drop(receiver)
            return
        answer = upgrade_answer(head)
        if answer is None:
            self.drop(receiver)
            return
        receiver.request = b""
        receiver.ready = True
        self.write(receiver, answer)

    def drop(self, receiver: Receiver) -> None:
        if self.receivers.pop(receiver.fd, None) is None:
            return
        with contextlib.suppress(OSError, ValueError):
            self.epoll.unregister(receiver.fd)
        with contextlib.suppress(OSError):
            receiver.sock.close()


def main() -> None:
    tls_port, wss_port, pub_port = (int(arg) for arg in sys.argv[1:4])
    context = server_context(Path(sys.argv[4]), Path(sys.argv[5]))
    server = Server(context, tls_port, wss_port, pub_port)
    print(
        f"listening tls 127.0.0.1:{tls_port} wss 127.0.0.1:{wss_port} "
        f"publishers tcp 127.0.0.1:{pub_port}",
        flush=True,
    )
    server.run()


if __name__ == "__main__":
    main()
