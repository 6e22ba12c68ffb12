"""The event loop of one bench process: epoll over its clients, timers, tickers, hooks."""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import heapq
import os
import select
import ssl
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from gateway.bench.client import Client
from gateway.bench.clock import now_ns
from gateway.bench.target import BenchError

if TYPE_CHECKING:
    from OpenSSL import SSL


class _Libc:
    """``timerfd`` through ctypes (``os.timerfd_create`` arrived in Python 3.13)."""

    def __init__(self) -> None:
        name = ctypes.util.find_library("c")
        self.lib = ctypes.CDLL(name, use_errno=True) if name else None

    def timerfd(self, interval_ns: int) -> int | None:
        lib = self.lib
        if lib is None or not hasattr(lib, "timerfd_create"):
            return None
        fd = int(lib.timerfd_create(time.CLOCK_MONOTONIC, os.O_NONBLOCK | os.O_CLOEXEC))
        if fd < 0:
            return None
        seconds, nanos = divmod(interval_ns, 1_000_000_000)
        spec = (ctypes.c_long * 4)(seconds, nanos, seconds, nanos)
        if lib.timerfd_settime(fd, 0, ctypes.byref(spec), None) != 0:
            os.close(fd)
            return None
        return fd


class Ticker:
    """Calls ``tick(n)`` at a fixed rate (n > 1 when the loop was late)."""

    def __init__(self, loop: Loop, interval_ns: int, tick: Callable[[int], None]) -> None:
        self.loop = loop
        self.tick = tick
        self.interval = interval_ns
        self.fd = _Libc().timerfd(interval_ns)
        self.next = now_ns() + interval_ns
        self.state = Client.READY
        if self.fd is not None:
            loop.register(self, select.EPOLLIN)
        else:
            loop.call_at(self.next, self._timer)

    def handle(self, events: int) -> None:
        assert self.fd is not None
        try:
            expirations = int.from_bytes(os.read(self.fd, 8), "little")
        except BlockingIOError:
            return
        self.tick(expirations)

    def _timer(self) -> None:
        if self.state == Client.CLOSED:
            return
        now = now_ns()
        due = 0
        while self.next <= now:
            self.next += self.interval
            due += 1
        if due:
            self.tick(due)
        self.loop.call_at(self.next, self._timer)

    def stop(self) -> None:
        self.state = Client.CLOSED
        if self.fd is not None:
            self.loop.unregister(self)
            os.close(self.fd)
            self.fd = None


class Loop:
    """An epoll loop over the clients of one process, with timers and per-turn hooks."""

    def __init__(self, buffer_size: int = 1 << 20, ca: str | None = None) -> None:
        self.epoll = select.epoll()
        self.handlers: dict[int, object] = {}
        self._callbacks: dict[int, Callable[[int], None]] = {}
        self.buffer = bytearray(buffer_size)
        self.view = memoryview(self.buffer)
        self.measuring = False
        self.parse_all = False
        self.now = now_ns()
        self.hooks: list[Callable[[], None]] = []
        self.busy: Callable[[], bool] | None = None
        self._timers: list[tuple[int, int, Callable[[], None]]] = []
        self._timer_ids = 0
        self.ca = ca
        self._contexts: dict[bool, ssl.SSLContext] = {}
        self._dtls: SSL.Context | None = None

    def tls_context(self, alpn: bool) -> ssl.SSLContext:
        context = self._contexts.get(alpn)
        if context is None:
            context = ssl.create_default_context(cafile=self.ca)
            if alpn:
                context.set_alpn_protocols(["http/1.1"])
            self._contexts[alpn] = context
        return context

    def dtls_context(self) -> SSL.Context:
        """The DTLS client context of the dtls:// subscribers, trusting ``ca`` (the DTLS
        engine, pyOpenSSL and Twisted's interfaces are loaded on the first call only)."""
        if self._dtls is None:
            from gateway.dtls.client import client_context, client_files
            from gateway.tls.files import TlsFileError

            try:
                trust, _ = client_files(Path(self.ca) if self.ca else None, None, None)
            except TlsFileError as e:
                raise BenchError(f"--ca: {e.problem}") from None
            self._dtls = client_context(trust)
        return self._dtls

    def register(self, client: Client | Ticker, events: int) -> None:
        fd = client.fd
        assert fd is not None and fd >= 0
        self.handlers[fd] = client
        self._callbacks[fd] = client.handle
        self.epoll.register(fd, events)
        if isinstance(client, Client):
            client._events = events

    def register_fd(self, fd: int, handler: Callable[[int], None]) -> None:
        self.handlers[fd] = handler
        self._callbacks[fd] = handler
        self.epoll.register(fd, select.EPOLLIN)

    def modify(self, client: Client, events: int) -> None:
        if client.fd < 0 or client.state == Client.CLOSED:
            return
        client._events = events
        try:
            self.epoll.modify(client.fd, events)
        except (FileNotFoundError, ValueError):
            self.register(client, events)

    def unregister(self, client: Client | Ticker) -> None:
        fd = client.fd
        if fd is None or fd < 0 or self.handlers.get(fd) is not client:
            return
        del self.handlers[fd]
        del self._callbacks[fd]
        with contextlib.suppress(OSError, ValueError):
            self.epoll.unregister(fd)

    def call_at(self, when: int, function: Callable[[], None]) -> None:
        self._timer_ids += 1
        heapq.heappush(self._timers, (when, self._timer_ids, function))

    def run_until(self, done: Callable[[], bool], deadline: int) -> bool:
        """Run until ``done()`` (True) or the monotonic ``deadline`` in ns (False)."""
        poll = self.epoll.poll
        callbacks = self._callbacks
        timers = self._timers
        hooks = self.hooks
        while True:
            now = self.now = now_ns()
            while timers and timers[0][0] <= now:
                heapq.heappop(timers)[2]()
                now = self.now = now_ns()
            if done():
                return True
            if now >= deadline:
                return False
            wake = min(deadline, timers[0][0]) if timers else deadline
            # Hooks that still have work (a flooding publisher) keep the loop from sleeping.
            timeout = 0.0 if self._busy() else max(0.0, (wake - now) / 1e9)
            for fd, mask in poll(min(timeout, 0.05)):
                callback = callbacks.get(fd)
                if callback is not None:
                    self.now = now_ns()
                    callback(mask)
            for hook in hooks:
                hook()

    def _busy(self) -> bool:
        return self.busy() if self.busy is not None else False

    def close(self) -> None:
        self.epoll.close()
