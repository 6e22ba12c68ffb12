"""Passwords and tokens at rest (gateway.auth.credentials) and the bounded password
checks off the reactor thread (gateway.auth.verifier)."""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterator

import bcrypt
import pytest
from argon2 import PasswordHasher, Type
from twisted.internet.defer import Deferred
from twisted.internet.testing import MemoryReactorClock
from twisted.logger import LogEvent, capturedLogs, formatEvent

from gateway.auth import verifier as verifier_module
from gateway.auth.credentials import (
    hash_password,
    new_token,
    password_hash_error,
    token_digest,
    token_digest_error,
    token_matches,
    verify_password,
)
from gateway.auth.verifier import Verifier, VerifierService, inline_runner, threaded_runner

# A cheap argon2id for tests of shape (the real defaults take 64 MiB a check).
FAST = PasswordHasher(time_cost=1, memory_cost=8, parallelism=1)


def _bcrypt(password: bytes, prefix: bytes = b"2b") -> str:
    return bcrypt.hashpw(password, bcrypt.gensalt(rounds=4, prefix=prefix)).decode("ascii")


# -- passwords ----------------------------------------------------------------


def test_a_hash_verifies_its_password_and_no_other():
    stored = hash_password("correct horse")
    assert stored.startswith("$argon2id$v=19$m=65536,t=3,p=4$")
    assert password_hash_error(stored) is None
    assert verify_password(stored, "correct horse")
    assert not verify_password(stored, "correct horse ")
    assert not verify_password(stored, "")


def test_each_hash_has_its_own_salt():
    assert hash_password("same") != hash_password("same")


def test_non_ascii_passwords_round_trip():
    stored = FAST.hash("pässwörd ✓")
    assert verify_password(stored, "pässwörd ✓")
    assert not verify_password(stored, "passwort")


def test_a_password_that_is_not_text_never_matches_nor_raises():
    assert not verify_password(FAST.hash("x"), "\udcff")
    assert not verify_password(_bcrypt(b"x"), "\udcff")


@pytest.mark.parametrize("prefix", [b"2a", b"2b"])
def test_bcrypt_hashes_made_by_the_bcrypt_library_verify(prefix):
    stored = _bcrypt("s3cret ✓".encode(), prefix)
    assert password_hash_error(stored) is None
    assert verify_password(stored, "s3cret ✓")
    assert not verify_password(stored, "s3cret")


def test_2y_bcrypt_hashes_verify():
    stored = "$2y$" + _bcrypt(b"php made me")[4:]
    assert password_hash_error(stored) is None
    assert verify_password(stored, "php made me")


def test_a_password_longer_than_bcrypt_reads_never_matches_a_bcrypt_hash():
    long = "a" * 72
    stored = _bcrypt(long.encode())
    assert verify_password(stored, long)
    # bcrypt would ignore everything past byte 72: refused instead of cut.
    assert not verify_password(stored, long + "b")
    # Bytes, not characters: 36 two-byte characters fit, 37 do not.
    assert verify_password(_bcrypt(("é" * 36).encode()), "é" * 36)
    assert not verify_password(_bcrypt(("é" * 36).encode()), "é" * 37)


def test_long_passwords_are_fine_with_argon2id():
    stored = FAST.hash("a" * 200)
    assert verify_password(stored, "a" * 200)
    assert not verify_password(stored, "a" * 199)


MALFORMED = [
    "",
    "hunter2",
    "password = hunter2",
    "$argon2id$",
    "$argon2id$v=19$m=65536,t=3,p=4$c2FsdHNhbHQ",
    "$argon2id$v=19$t=3,m=65536,p=4$c2FsdHNhbHQ$aGFzaGhhc2hoYXNo",  # fields out of order
    "$argon2id$v=18$m=65536,t=3,p=4$c2FsdHNhbHQ$aGFzaGhhc2hoYXNo",  # no such version
    "$argon2id$v=19$m=65536,t=0,p=4$c2FsdHNhbHQ$aGFzaGhhc2hoYXNo",  # no passes
    "$argon2id$v=19$m=16,t=3,p=4$c2FsdHNhbHQ$aGFzaGhhc2hoYXNo",  # m < 8 p
    "$argon2id$v=19$m=65536,t=3,p=4$c2FsdA$aGFzaGhhc2hoYXNo",  # a 4-byte salt
    "$argon2id$v=19$m=65536,t=3,p=4$c2FsdHNhbHQ$aGFz",  # a 3-byte hash
    "$argon2id$v=19$m=65536,t=3,p=4$c2FsdHNhbHQ=$aGFzaGhhc2hoYXNo",  # padding
    "$argon2id$v=19$m=65536,t=3,p=4$c2FsdHNhbHR$aGFzaGhhc2hoYXNo",  # stray low bits
    "$argon2id$v=19$m=\uff16\uff15\uff15\uff13\uff16,t=3,p=4$c2FsdHNhbHQ$aGFzaGhhc2hoYXNo",  # not ASCII digits
    "$2b$12$short",
    "$2b$03$" + "a" * 53,  # cost below bcrypt's 4
    "$2b$12$" + "a" * 52,
    "$2b$12$" + "/" * 22 + "a" * 31,  # a salt whose last character has stray bits
    "$2x$12$" + "." * 53,
    "$1$saltsalt$2vcVBG6X5DCUvoqIVWOU50",  # md5-crypt
    "$5$rounds=5000$salt$hash",  # sha256-crypt
    "{SSHA}hashhash",
]


@pytest.mark.parametrize("stored", MALFORMED)
def test_a_malformed_or_unsupported_hash_never_matches_and_is_explained(stored):
    reason = password_hash_error(stored)
    assert isinstance(reason, str)
    assert reason
    assert not verify_password(stored, "hunter2")
    assert not verify_password(stored, "")


def test_a_hash_with_a_trailing_newline_is_refused():
    stored = FAST.hash("x")
    assert password_hash_error(stored + "\n") is not None
    assert not verify_password(stored + "\n", "x")
    assert password_hash_error(_bcrypt(b"x") + "\n") is not None


def test_a_plain_text_password_is_refused_with_the_hint():
    reason = password_hash_error("hunter2")
    assert reason is not None
    assert "gateway passwd" in reason
    assert "$argon2id$" in reason
    assert "$2b$" in reason


@pytest.mark.parametrize("kind", [Type.I, Type.D])
def test_argon2i_and_argon2d_are_refused(kind):
    stored = PasswordHasher(time_cost=1, memory_cost=8, parallelism=1, type=kind).hash("x")
    reason = password_hash_error(stored)
    assert reason is not None
    assert kind.name.lower() in reason or "argon2" in reason
    assert not verify_password(stored, "x")


def test_argon2id_with_other_parameters_verifies():
    stored = FAST.hash("x")
    assert stored.startswith("$argon2id$v=19$m=8,t=1,p=1$")
    assert password_hash_error(stored) is None
    assert verify_password(stored, "x")


def test_an_argon2id_hash_of_the_old_version_is_accepted():
    stored = FAST.hash("x").replace("$v=19$", "$v=16$")
    assert password_hash_error(stored) is None
    assert not verify_password(stored, "x")  # a different function: it does not match


# -- tokens -------------------------------------------------------------------


def test_tokens_are_fresh_and_long():
    tokens = {new_token() for _ in range(50)}
    assert len(tokens) == 50
    assert all(len(t) >= 43 for t in tokens)


def test_a_token_never_starts_like_a_command_line_option():
    # One random token in 64 would begin with "-"; 2,000 of them meet that ~31 times.
    tokens = [new_token() for _ in range(2000)]
    assert not any(token.startswith("-") for token in tokens)
    assert any("-" in token for token in tokens)  # "-" stays in the alphabet elsewhere


def test_the_digest_is_lowercase_hex_sha256_of_the_utf8_text():
    assert token_digest("abc") == hashlib.sha256(b"abc").hexdigest()
    assert token_digest("é") == hashlib.sha256("é".encode()).hexdigest()
    assert token_digest_error(token_digest(new_token())) is None


def test_a_token_matches_its_digest_in_either_case():
    token = new_token()
    digest = token_digest(token)
    assert token_matches(digest, token)
    assert token_matches(digest.upper(), token)
    assert not token_matches(digest, token + "x")
    assert not token_matches(digest, "")
    assert not token_matches(token_digest("other"), token)


@pytest.mark.parametrize(
    "stored", ["", "abc", "g" * 64, "a" * 63, "a" * 65, " " + "a" * 64, "a" * 64 + "\n", "é" * 64]
)
def test_a_malformed_digest_is_explained_and_never_matches(stored):
    assert token_digest_error(stored) is not None
    assert not token_matches(stored, "anything")


def test_a_token_that_is_not_text_never_matches():
    assert not token_matches(token_digest("x"), "\udcff")


# -- the verifier ---------------------------------------------------------------


class FakeRunner:
    """A runner whose checks run only when the test says so."""

    def __init__(self) -> None:
        self.pending: list[tuple[Callable[[], bool], Deferred[bool]]] = []
        self.most = 0

    def __call__(self, check: Callable[[], bool]) -> Deferred[bool]:
        d: Deferred[bool] = Deferred()
        self.pending.append((check, d))
        self.most = max(self.most, len(self.pending))
        return d

    def finish(self, index: int = 0) -> None:
        check, d = self.pending.pop(index)
        try:
            result = check()
        except Exception as e:
            d.errback(e)
        else:
            d.callback(result)


class ThreadsReactor:
    """Just ``callFromThread``: calls from the pool's threads, run when the test says."""

    def __init__(self) -> None:
        self.calls: list[tuple[Callable[..., object], tuple[object, ...]]] = []

    def callFromThread(self, f: Callable[..., object], *args: object) -> None:
        self.calls.append((f, args))  # list.append is atomic

    def run_calls(self) -> None:
        while self.calls:
            f, args = self.calls.pop(0)
            f(*args)


def _results(deferreds: list[Deferred[bool]]) -> list[bool | None]:
    out: list[bool | None] = [None] * len(deferreds)
    for i, d in enumerate(deferreds):
        d.addCallback(_store, out, i)
    return out


def _store(result: bool, out: list[bool | None], index: int) -> None:
    out[index] = result


def _note(result: bool, order: list[str], name: str) -> None:
    order.append(name)


@pytest.fixture
def events() -> Iterator[Callable[[], list[LogEvent]]]:
    """The events the verifier logged so far."""
    with capturedLogs() as captured:
        yield lambda: [e for e in captured if e.get("log_namespace") == "gateway.auth"]


def test_at_most_concurrency_checks_run_at_once_and_the_rest_wait_in_order():
    stored = FAST.hash("right")
    run = FakeRunner()
    verifier = Verifier(run, concurrency=2)
    passwords = ["right", "wrong", "right", "nope", "right", "x"]
    results = _results([verifier.verify(stored, p) for p in passwords])
    assert len(run.pending) == 2
    assert verifier.running == 2
    assert verifier.waiting == 4
    assert results == [None] * 6
    # Finish the second first: the next in line (the third) starts, no other.
    run.finish(1)
    assert results == [None, False, None, None, None, None]
    assert len(run.pending) == 2
    while run.pending:
        run.finish(0)
    assert results == [True, False, True, False, True, False]
    assert run.most == 2
    assert verifier.running == 0
    assert verifier.waiting == 0


def test_waiting_checks_start_first_come_first_served():
    run = FakeRunner()
    verifier = Verifier(run, concurrency=1)
    order: list[str] = []
    stored = FAST.hash("x")
    for name in ["a", "b", "c", "d"]:
        verifier.verify(stored, name).addCallback(_note, order, name)
    while run.pending:
        run.finish()
    assert order == ["a", "b", "c", "d"]


def test_a_check_started_by_a_callback_queues_behind_those_waiting():
    run = FakeRunner()
    verifier = Verifier(run, concurrency=1)
    stored = FAST.hash("x")
    order: list[str] = []
    first = verifier.verify(stored, "first")
    verifier.verify(stored, "second").addCallback(lambda _: order.append("second"))
    first.addCallback(
        lambda _: verifier.verify(stored, "third").addCallback(lambda _: order.append("third"))
    )
    while run.pending:
        run.finish()
    assert order == ["second", "third"]


def test_past_max_waiting_a_check_fires_false_at_once(events):
    stored = FAST.hash("secret-password")
    run = FakeRunner()
    verifier = Verifier(run, concurrency=1, max_waiting=2)
    queued = _results([verifier.verify(stored, "secret-password") for _ in range(3)])
    refused = _results([verifier.verify(stored, "secret-password") for _ in range(3)])
    assert refused == [False, False, False]
    assert verifier.refused == 3
    assert len(run.pending) == 1
    assert len(events()) == 1  # once per spell of refusals, not once per refusal
    assert "secret-password" not in formatEvent(events()[0])
    assert "secret-password" not in repr(events()[0])
    while run.pending:
        run.finish()
    assert queued == [True, True, True]
    # The line is short again: checks are taken, and a later overflow is logged again.
    again = _results([verifier.verify(stored, "secret-password") for _ in range(4)])
    assert again == [None, None, None, False]
    assert len(events()) == 2


def test_a_check_that_raises_fires_false_and_logs_no_secret(events, monkeypatch):
    password = "pa55-word-never-logged"
    stored = FAST.hash(password)

    def broken(stored: str, password: str) -> bool:
        raise RuntimeError(f"exploded on {stored} {password}")

    monkeypatch.setattr(verifier_module, "verify_password", broken)
    run = FakeRunner()
    verifier = Verifier(run)
    results = _results([verifier.verify(stored, password), verifier.verify(stored, password)])
    run.finish()
    run.finish()
    assert results == [False, False]
    assert len(events()) == 2
    for event in events():
        assert event["log_level"].name == "warn"
        text = formatEvent(event) + repr(event)
        assert "RuntimeError" in formatEvent(event)
        assert password not in text
        assert stored not in text
        assert "log_failure" not in event


def test_a_runner_that_raises_at_once_fires_false_and_frees_its_slot(events):
    def refusing(check: Callable[[], bool]) -> Deferred[bool]:
        raise OSError("no threads")

    verifier = Verifier(refusing, concurrency=1)
    results = _results([verifier.verify(FAST.hash("x"), "x") for _ in range(3)])
    assert results == [False, False, False]
    assert verifier.running == 0
    assert len(events()) == 3


def test_a_long_line_of_checks_failing_at_once_does_not_overflow_the_stack(events):
    run = FakeRunner()
    broken = False

    def runner(check: Callable[[], bool]) -> Deferred[bool]:
        if broken:
            raise OSError("pool gone")
        return run(check)

    verifier = Verifier(runner, concurrency=1, max_waiting=5000)
    results = _results([verifier.verify("not a hash", "x") for _ in range(5001)])
    broken = True
    run.finish()
    assert results == [False] * 5001
    assert verifier.running == 0
    assert verifier.waiting == 0


def test_cancelling_a_waiting_check_drops_it_from_the_line():
    run = FakeRunner()
    verifier = Verifier(run, concurrency=1)
    stored = FAST.hash("x")
    first = verifier.verify(stored, "x")
    second = verifier.verify(stored, "x")
    third = verifier.verify(stored, "x")
    second.addErrback(lambda f: None)
    second.cancel()
    assert verifier.waiting == 1
    results = _results([first, third])
    run.finish()
    assert len(run.pending) == 1
    run.finish()
    assert results == [True, True]


def test_cancelling_a_running_check_keeps_its_slot_until_it_ends():
    run = FakeRunner()
    verifier = Verifier(run, concurrency=1)
    stored = FAST.hash("x")
    first = verifier.verify(stored, "x")
    first.addErrback(lambda f: None)
    first.cancel()
    second = _results([verifier.verify(stored, "x")])
    assert verifier.running == 1
    assert len(run.pending) == 1
    run.finish()  # the first's result is dropped; the second starts
    run.finish()
    assert second == [True]


def test_close_refuses_those_waiting_and_all_later_checks():
    run = FakeRunner()
    verifier = Verifier(run, concurrency=1)
    stored = FAST.hash("x")
    results = _results([verifier.verify(stored, "x") for _ in range(3)])
    verifier.close()
    assert results == [None, False, False]
    assert _results([verifier.verify(stored, "x")]) == [False]
    run.finish()
    assert results == [True, False, False]
    assert run.pending == []


def test_the_inline_runner_checks_at_once():
    verifier = Verifier(inline_runner())
    stored = FAST.hash("x")
    assert _results([verifier.verify(stored, "x"), verifier.verify(stored, "y")]) == [True, False]
    assert _results([verifier.verify("not a hash", "x")]) == [False]


def test_the_inline_runner_turns_an_exception_into_a_failure():
    def boom() -> bool:
        raise ValueError("boom")

    d = inline_runner()(boom)
    failures: list[object] = []
    d.addErrback(failures.append)
    assert len(failures) == 1


def test_bad_limits_are_refused():
    with pytest.raises(ValueError, match="concurrency"):
        Verifier(inline_runner(), concurrency=0)
    with pytest.raises(ValueError, match="max_waiting"):
        Verifier(inline_runner(), max_waiting=-1)
    with pytest.raises(ValueError, match="threads"):
        VerifierService(MemoryReactorClock(), threads=0)


def test_the_threaded_runner_fails_once_its_pool_is_stopped():
    service = VerifierService(ThreadsReactor(), threads=1)
    service.startService()
    service.stopService()
    failures: list[object] = []
    threaded_runner(MemoryReactorClock(), service.pool)(lambda: True).addErrback(failures.append)
    assert len(failures) == 1


def test_the_service_starts_and_stops_its_pool():
    reactor = ThreadsReactor()
    service = VerifierService(reactor, threads=3)
    assert not service.pool.started
    assert service.pool.max == 3
    service.startService()
    assert service.running
    assert service.pool.started
    assert not service.pool.joined
    service.stopService()
    assert not service.running
    assert service.pool.joined
    assert not any(thread.is_alive() for thread in service.pool.threads)
    # Stopped: a check is refused at once rather than never answered.
    assert _results([service.verifier.verify(FAST.hash("x"), "x")]) == [False]


def test_the_service_checks_in_its_threads():
    reactor = ThreadsReactor()
    service = VerifierService(reactor, threads=2)
    stored = FAST.hash("x")
    # Not started yet: the first two are handed to the pool, which runs them once started.
    results = _results([service.verifier.verify(stored, p) for p in ["x", "y", "x"]])
    assert service.verifier.waiting == 1
    service.startService()
    service.stopService()  # the running checks end first; the waiting one is refused
    assert results == [None, None, False]
    reactor.run_calls()  # their results, handed back to the "reactor thread"
    assert results == [True, False, False]
