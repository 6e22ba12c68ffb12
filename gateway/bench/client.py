"""A socket in the loop: connect (and TLS), send, read, close; the base of every client."""

from __future__ import annotations

import contextlib
import errno
import os
import select
import socket
import ssl
from typing import TYPE_CHECKING

from gateway.bench.clock import now_ns

if TYPE_CHECKING:
    from gateway.bench.loop import Loop
    from gateway.bench.target import Target

IP_BIND_ADDRESS_NO_PORT = 24  # linux/in.h; not in Python's socket module before 3.12


class Client:
    """One socket in the loop, from connect to close."""

    CONNECTING, HANDSHAKE, SETUP, READY, CLOSED = range(5)

    def __init__(self, loop: Loop, target: Target, source: str | None = None) -> None:
        self.loop = loop
        self.target = target
        self.source = source
        self.state = self.CONNECTING
        self.error: str | None = None
        self.sock: socket.socket | ssl.SSLSocket | None = None
        self.fd = -1
        self.out = b""
        self._events = 0
        self.ready_at = 0

    # Life cycle

    def start(self) -> None:
        target = self.target
        family = socket.AF_INET6 if ":" in target.host else socket.AF_INET
        kind = socket.SOCK_DGRAM if target.datagram else socket.SOCK_STREAM
        sock = socket.socket(family, kind)
        sock.setblocking(False)
        if self.source is not None:
            if kind == socket.SOCK_STREAM:
                sock.setsockopt(socket.IPPROTO_IP, IP_BIND_ADDRESS_NO_PORT, 1)
            sock.bind((self.source, 0))
        self.sock = sock
        self.fd = sock.fileno()
        if kind == socket.SOCK_STREAM:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            code = sock.connect_ex((target.host, target.port))
            if code not in (0, errno.EINPROGRESS):
                self.fail(f"connect: {os.strerror(code)}")
                return
            self.loop.register(self, select.EPOLLOUT)
        else:
            sock.connect((target.host, target.port))
            self.loop.register(self, select.EPOLLIN)
            self.connected()

    def handle(self, events: int) -> None:
        state = self.state
        if state == self.READY:
            if events & select.EPOLLIN:
                self.readable()
            if events & select.EPOLLOUT and self.state == self.READY:
                self.flush()
            if events & (select.EPOLLERR | select.EPOLLHUP) and self.state == self.READY:
                self.readable()
            return
        if state == self.CONNECTING:
            assert self.sock is not None
            code = self.sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
            if code:
                self.fail(f"connect: {os.strerror(code)}")
                return
            if self.target.secure:
                self._start_tls()
            else:
                self.connected()
        elif state == self.HANDSHAKE:
            self._tls_step()
        elif state == self.SETUP:
            if events & select.EPOLLOUT and self.out:
                self.flush()
            if events & (select.EPOLLIN | select.EPOLLERR | select.EPOLLHUP):
                self.setup_readable()
        elif state == self.CLOSED:
            self.loop.unregister(self)

    def _start_tls(self) -> None:
        assert self.sock is not None
        context = self.loop.tls_context(alpn=self.target.scheme == "wss")
        self.loop.unregister(self)
        self.sock = context.wrap_socket(
            self.sock, server_hostname=self.target.host, do_handshake_on_connect=False
        )
        self.fd = self.sock.fileno()
        self.state = self.HANDSHAKE
        self.loop.register(self, select.EPOLLIN)
        self._tls_step()

    def _tls_step(self) -> None:
        sock = self.sock
        assert isinstance(sock, ssl.SSLSocket)
        try:
            sock.do_handshake()
        except ssl.SSLWantReadError:
            self.loop.modify(self, select.EPOLLIN)
            return
        except ssl.SSLWantWriteError:
            self.loop.modify(self, select.EPOLLOUT)
            return
        except (ssl.SSLError, OSError) as e:
            self.fail(f"TLS handshake: {e}")
            return
        self.loop.modify(self, select.EPOLLIN)
        self.connected()

    def connected(self) -> None:
        """The transport is up (after TLS, when any); start the protocol's own setup."""
        self.ready()

    def ready(self) -> None:
        self.ready_at = now_ns()
        self.state = self.READY
        self.loop.modify(self, select.EPOLLIN | (select.EPOLLOUT if self.out else 0))

    def setup_readable(self) -> None:
        raise NotImplementedError

    def readable(self) -> None:
        raise NotImplementedError

    def fail(self, error: str) -> None:
        if self.state == self.CLOSED:
            return
        if self.error is None:
            self.error = error
        self.close()

    def close(self) -> None:
        if self.state == self.CLOSED:
            return
        self.state = self.CLOSED
        self.loop.unregister(self)
        if self.sock is not None:
            with contextlib.suppress(OSError):
                self.sock.close()

    # Output

    def send(self, data: bytes) -> None:
        """Write ``data`` now, keeping what the socket does not take for later."""
        if self.state == self.CLOSED:
            return
        self.out += data
        self.flush()

    def flush(self) -> None:
        sock = self.sock
        assert sock is not None
        out = self.out
        while out:
            try:
                sent = sock.send(out)
            except (BlockingIOError, ssl.SSLWantWriteError, ssl.SSLWantReadError):
                break
            except OSError as e:
                self.fail(f"send: {e}")
                return
            out = out[sent:]
        self.out = out
        wanted = select.EPOLLIN | (select.EPOLLOUT if out else 0)
        if wanted != self._events:
            self.loop.modify(self, wanted)

    def read_into(self, view: memoryview) -> int:
        """Read what is available into ``view``; -1 when nothing was, 0 at end of stream."""
        sock = self.sock
        assert sock is not None
        try:
            return sock.recv_into(view)
        except (BlockingIOError, ssl.SSLWantReadError, ssl.SSLWantWriteError):
            return -1
        except OSError as e:
            self.fail(f"receive: {e}")
            return 0
