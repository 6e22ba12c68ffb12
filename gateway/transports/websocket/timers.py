"""Autobahn's timers on the injected clock."""

from __future__ import annotations

from collections.abc import Callable

from twisted.internet.interfaces import IDelayedCall, IReactorTime


class _Cancellable:
    __slots__ = ("call",)

    def __init__(self, call: IDelayedCall) -> None:
        self.call = call

    def cancel(self) -> None:
        if self.call.active():
            self.call.cancel()


class ClockTimer:
    """Autobahn's timer interface (txaio ``IBatchedTimer``) on the injected clock.

    Autobahn otherwise schedules its handshake, close and ping timers on
    txaio's global reactor, in whole-second buckets.
    """

    def __init__(self, clock: IReactorTime) -> None:
        self.clock = clock

    def call_later(
        self, delay: float, func: Callable[..., object], *args: object, **kwargs: object
    ) -> _Cancellable:
        return _Cancellable(self.clock.callLater(delay, func, *args, **kwargs))
