"""dtls:// subscribers: a UDP socket of the loop and a sans-I/O ``DtlsClient``.

A subscriber joins by completing the handshake (the listener makes it a peer
then: there is no hello datagram), and from then on counts each record as a
UDP subscriber counts each datagram: a message of the bench is its payload
and ``\\n``. Lossy as udp. Its keepalive is a record holding only ``\\n``
(the gateway relays no empty message), and closing sends a close_notify.

This module is imported for dtls:// URLs only: it loads the DTLS engine
(pyOpenSSL, and Twisted's ``IReactorTime``/``IDelayedCall``, which ``LoopClock``
provides on the bench's own loop so that retransmission timers run there).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from twisted.internet.error import AlreadyCalled, AlreadyCancelled
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from zope.interface import implementer

from gateway.bench.clock import SECOND, now_ns
from gateway.bench.subscribers import DatagramClient, Tally
from gateway.dtls.client import DtlsClient

if TYPE_CHECKING:
    from gateway.bench.loop import Loop
    from gateway.bench.target import Target

KEEPALIVE = b"\n"


@implementer(IDelayedCall)
class _Timer:
    """One ``LoopClock.callLater``: runs from the loop's timers once its time has come."""

    def __init__(
        self, clock: LoopClock, delay: float, function: Callable[..., Any], args: Any, kw: Any
    ) -> None:
        self.clock = clock
        self.function = function
        self.args = args
        self.kw = kw
        self.called = False
        self.cancelled = False
        self.due = now_ns() + int(delay * SECOND)
        clock.wake(self)

    def getTime(self) -> float:
        return self.due / SECOND

    def cancel(self) -> None:
        self._check()
        self.cancelled = True
        self.clock.forget(self)

    def delay(self, secondsLater: float) -> None:
        self._check()
        self.due += int(secondsLater * SECOND)
        self.clock.wake(self)

    def reset(self, secondsFromNow: float) -> None:
        self._check()
        self.due = now_ns() + int(secondsFromNow * SECOND)
        self.clock.wake(self)

    def active(self) -> bool:
        return not (self.called or self.cancelled)

    def _check(self) -> None:
        if self.cancelled:
            raise AlreadyCancelled
        if self.called:
            raise AlreadyCalled

    def fire(self) -> None:
        """The loop's timer for this call (or for an earlier time of it) fell due."""
        if self.active() and now_ns() >= self.due:
            self.called = True
            self.clock.forget(self)
            self.function(*self.args, **self.kw)


@implementer(IReactorTime)
class LoopClock:
    """``IReactorTime`` on a bench ``Loop``: the monotonic clock and the loop's timers."""

    def __init__(self, loop: Loop) -> None:
        self.loop = loop
        self._calls: set[_Timer] = set()

    def seconds(self) -> float:
        return now_ns() / SECOND

    def callLater(
        self, delay: float, callable: Callable[..., Any], *args: object, **kw: object
    ) -> IDelayedCall:
        return _Timer(self, delay, callable, args, kw)

    def getDelayedCalls(self) -> list[IDelayedCall]:
        return list(self._calls)

    def wake(self, call: _Timer) -> None:
        """Have the loop look at ``call`` when it is due (a moved call is looked at twice)."""
        self._calls.add(call)
        self.loop.call_at(call.due, call.fire)

    def forget(self, call: _Timer) -> None:
        self._calls.discard(call)


class DtlsSubscriber(DatagramClient):
    """A dtls:// subscriber: ready once its handshake is done, then one message per record."""

    def __init__(
        self, loop: Loop, target: Target, tally: Tally, size: int, source: str | None = None
    ) -> None:
        super().__init__(loop, target, tally, size, source)
        self.session: DtlsClient | None = None
        self._closing = False

    def connected(self) -> None:
        """The socket is connected: start the handshake (``setup_readable`` goes on with it)."""
        self.state = self.SETUP
        clock = LoopClock(self.loop)
        self.session = DtlsClient(self.loop.dtls_context(), self.target.host, self, clock)
        self.session.start()

    # The session's owner (``ClientOwner``)

    def transmit(self, datagram: bytes) -> None:
        if self.sock is not None and self.state != self.CLOSED:
            with contextlib.suppress(OSError):  # a refusal shows on the next receive
                self.sock.send(datagram)

    def handshake_completed(self) -> None:
        assert self.session is not None
        most = self.session.max_message_bytes
        if self.size + 1 > most:
            self.fail(f"{self.size}-byte messages do not fit one DTLS record (at most {most - 1})")
            return
        self.ready()

    def session_ended(self, reason: str) -> None:
        if not self._closing:
            self.fail(f"DTLS: {reason}")

    # Receiving

    def setup_readable(self) -> None:
        self.readable()

    def readable(self) -> None:
        sock = self.sock
        session = self.session
        assert sock is not None and session is not None
        message = self.message
        for _ in range(512):
            try:
                datagram = sock.recv(65536)
            except BlockingIOError:
                return
            except OSError as e:  # e.g. ICMP port unreachable: the listener is gone
                self.fail(f"receive: {e}")
                return
            for record in session.receive(datagram):
                message(record, len(record))
            if self.state == self.CLOSED:
                return

    def keepalive(self) -> None:
        if self.state == self.READY and self.session is not None:
            self.session.send(KEEPALIVE)

    def close(self) -> None:
        """Say goodbye (close_notify, once the handshake is done), then close the socket."""
        session = self.session
        if self.state != self.CLOSED and session is not None and not session.ended:
            self._closing = True
            session.close()
        super().close()
