"""``worker.soft_limit``: the soft time limit's signal recorded for the attempt, then handled as before."""

from __future__ import annotations

import signal
import threading
from collections.abc import Iterator

import pytest
from billiard.pool import soft_timeout_sighandler
from celery.exceptions import SoftTimeLimitExceeded

from worker import soft_limit

SIGNAL = soft_limit.SIGNAL
pytestmark = pytest.mark.skipif(SIGNAL is None, reason="no SIGUSR1 on this platform")


@pytest.fixture()
def pool_child_handler() -> Iterator[object]:
    """The handler billiard installs in a pool child, as it is there while the test runs."""
    assert SIGNAL is not None
    previous = signal.signal(SIGNAL, soft_timeout_sighandler)
    yield soft_timeout_sighandler
    signal.signal(SIGNAL, previous)


def test_the_signal_is_recorded_and_still_raises_the_limit(pool_child_handler: object) -> None:
    assert SIGNAL is not None
    with soft_limit.watching() as limit:
        assert not limit.fired
        limit.check()  # nothing to raise yet
        with pytest.raises(SoftTimeLimitExceeded):
            signal.raise_signal(SIGNAL)
        assert limit.fired
        with pytest.raises(SoftTimeLimitExceeded):  # raised again, however often it was swallowed
            limit.check()
        with pytest.raises(SoftTimeLimitExceeded):
            limit.check()
    assert signal.getsignal(SIGNAL) is pool_child_handler


def test_the_handler_is_put_back_when_the_job_ends_with_an_error(pool_child_handler: object) -> None:
    assert SIGNAL is not None
    with pytest.raises(KeyError), soft_limit.watching():
        raise KeyError("the job's own failure")
    assert signal.getsignal(SIGNAL) is pool_child_handler


def test_outside_a_pool_child_nothing_is_wrapped() -> None:
    """With the default disposition (a process that is no pool child) or off the main thread (an
    in-process runner in a thread), ``watching`` installs nothing and its limit never fires."""
    assert SIGNAL is not None
    previous = signal.signal(SIGNAL, signal.SIG_DFL)
    try:
        with soft_limit.watching() as limit:
            assert signal.getsignal(SIGNAL) == signal.SIG_DFL
        assert not limit.fired
    finally:
        signal.signal(SIGNAL, previous)

    seen: list[object] = []

    def in_a_thread() -> None:
        with soft_limit.watching() as limit:
            seen.append(limit.fired)

    signal.signal(SIGNAL, soft_timeout_sighandler)
    try:
        thread = threading.Thread(target=in_a_thread)
        thread.start()
        thread.join(10)
        assert seen == [False] and signal.getsignal(SIGNAL) is soft_timeout_sighandler
    finally:
        signal.signal(SIGNAL, previous)
