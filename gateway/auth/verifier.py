"""Password verification off the reactor thread, a few at a time.

A password hash takes tens of milliseconds and tens of megabytes by design, so a storm
of sign-ins run on the reactor thread would stall fan-out for everyone. A
:class:`Verifier` hands each check to a *runner* (a thread pool in the server, see
:func:`threaded_runner` and :class:`VerifierService`; at once in tests, see
:func:`inline_runner`), never more than ``concurrency`` at once; the rest wait in
line, first come first served, and past ``max_waiting`` waiting a check is refused
at once (a failed sign-in) instead of growing the line without limit.

Token checks are one SHA-256 and stay on the reactor thread
(``gateway.auth.credentials.token_matches``).
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from functools import partial
from typing import Any

from twisted.application.service import Service
from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.python.threadpool import ThreadPool

from gateway.auth.credentials import verify_password

Check = Callable[[], bool]
Runner = Callable[[Check], "Deferred[bool]"]
"""Runs a check somewhere and fires with its result (or fails with its exception)."""

log = Logger(namespace="gateway.auth")


class Verifier:
    """Checks passwords through ``run``, at most ``concurrency`` at once.

    ``verify`` always returns a Deferred that fires True or False, never an error
    (unless the caller cancels it: cancelling a check still waiting drops it from
    the line; one already running finishes, and its result is dropped).
    """

    def __init__(self, run: Runner, concurrency: int = 2, max_waiting: int = 1000) -> None:
        if concurrency < 1:
            raise ValueError(f"concurrency must be at least 1, not {concurrency}")
        if max_waiting < 0:
            raise ValueError(f"max_waiting must not be negative, not {max_waiting}")
        self._run = run
        self._concurrency = concurrency
        self._max_waiting = max_waiting
        self._waiting: deque[tuple[Check, Deferred[bool]]] = deque()
        self._running = 0
        self._full = False
        self._closed = False
        self._pumping = False
        self.refused = 0
        """Checks refused at once because the line was full (or the verifier closed)."""

    @property
    def running(self) -> int:
        """Checks handed to the runner and not finished yet."""
        return self._running

    @property
    def waiting(self) -> int:
        """Checks waiting for a free slot."""
        return len(self._waiting)

    def verify(self, stored: str, password: str) -> Deferred[bool]:
        """Fires True iff ``password`` matches the hash ``stored`` (see ``verify_password``)."""
        check = partial(verify_password, stored, password)
        if self._closed:
            self.refused += 1
            return succeed(False)
        if self._running < self._concurrency:
            result: Deferred[bool] = Deferred()
            self._start(check, result)
            return result
        if len(self._waiting) >= self._max_waiting:
            self.refused += 1
            if not self._full:
                self._full = True
                log.warn(
                    "too many password checks waiting ({waiting}); refusing sign-ins "
                    "until the line shortens",
                    waiting=len(self._waiting),
                )
            return succeed(False)
        waiting: Deferred[bool] = Deferred(self._drop)
        self._waiting.append((check, waiting))
        return waiting

    def close(self) -> None:
        """Refuse every check from now on, those waiting included (they fire False)."""
        self._closed = True
        while self._waiting:
            _, result = self._waiting.popleft()
            self.refused += 1
            result.callback(False)

    def _start(self, check: Check, result: Deferred[bool]) -> None:
        self._running += 1
        try:
            done = self._run(check)
        except Exception:
            done = fail()
        done.addCallbacks(self._succeeded, self._failed)
        done.addCallback(self._finished, result)

    def _succeeded(self, matched: bool) -> bool:
        return matched is True

    def _failed(self, reason: Failure) -> bool:
        # The exception's type only: its message or arguments might hold the secret.
        log.warn(
            "a password check failed with {error}; counted as a mismatch",
            error=type(reason.value).__name__,
        )
        return False

    def _finished(self, matched: bool, result: Deferred[bool]) -> None:
        self._running -= 1
        # Start the next in line before telling this caller, so that a check the caller
        # starts in its callback queues behind those already waiting.
        self._pump()
        if not result.called:
            result.callback(matched)

    def _pump(self) -> None:
        # A check that ends at once (a runner failing synchronously) pumps again from
        # inside _start: the outer loop carries on instead, so the stack stays flat
        # however long the line.
        if self._pumping:
            return
        self._pumping = True
        try:
            while self._waiting and self._running < self._concurrency:
                check, result = self._waiting.popleft()
                self._start(check, result)
        finally:
            self._pumping = False
        if len(self._waiting) < self._max_waiting:
            self._full = False

    def _drop(self, cancelled: Deferred[bool]) -> None:
        for entry in self._waiting:
            if entry[1] is cancelled:
                self._waiting.remove(entry)
                break


def threaded_runner(reactor: Any, pool: ThreadPool) -> Runner:
    """A runner that runs each check in ``pool``'s threads and fires on the reactor thread.

    ``reactor`` provides ``IReactorFromThreads``; ``pool`` must be started for a check
    to run (checks handed over before that wait in it). Once ``pool`` is stopped a check
    fails at once instead of never firing. Give the Verifier a ``concurrency`` no
    larger than the pool's threads, so the line is the Verifier's, where it is bounded.
    """

    def run(check: Check) -> Deferred[bool]:
        if pool.joined:
            return fail(RuntimeError("the password check thread pool is stopped"))
        done: Deferred[bool] = deferToThreadPool(reactor, pool, check)
        return done

    return run


def inline_runner() -> Runner:
    """A runner that runs each check at once, on the calling thread.

    For tests (with ``MemoryReactorClock`` or no reactor at all) and tools: the
    Deferred it returns has already fired. Never in the server, where it would hash
    on the reactor thread.
    """

    def run(check: Check) -> Deferred[bool]:
        try:
            return succeed(check())
        except Exception:
            return fail()

    return run


class VerifierService(Service):
    """Owns the password check threads and the :class:`Verifier` that uses them.

    ``verifier`` is ready at once; checks handed to it before ``startService`` wait
    and run once it starts. ``stopService`` refuses those still waiting (they fire
    False) and stops the threads once the running checks end.
    """

    def __init__(self, reactor: Any, threads: int = 2, max_waiting: int = 1000) -> None:
        if threads < 1:
            raise ValueError(f"threads must be at least 1, not {threads}")
        self.pool = ThreadPool(minthreads=0, maxthreads=threads, name="gateway-passwords")
        self.verifier = Verifier(
            threaded_runner(reactor, self.pool), concurrency=threads, max_waiting=max_waiting
        )

    def startService(self) -> None:
        super().startService()  # type: ignore[no-untyped-call]
        self.pool.start()

    def stopService(self) -> None:
        self.verifier.close()
        self.pool.stop()
        super().stopService()  # type: ignore[no-untyped-call]
