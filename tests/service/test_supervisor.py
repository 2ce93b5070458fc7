"""The worker supervisor on real short-lived processes: restarts with backoff, gives up on a crash loop."""

from __future__ import annotations

import itertools
import subprocess
import sys
import time

from worker.supervisor import WorkerSupervisor


def _process(code: str) -> subprocess.Popen[bytes]:
    return subprocess.Popen([sys.executable, "-c", code])


def _stop(worker: subprocess.Popen[bytes]) -> None:
    worker.kill()
    worker.wait(timeout=10)


def _until_given_up(supervisor: WorkerSupervisor, timeout: float = 30) -> None:
    """Wait (bounded) for the supervisor to give up, then stop it."""
    deadline = time.monotonic() + timeout
    while supervisor.gave_up is None and time.monotonic() < deadline:
        time.sleep(0.05)
    supervisor.stop()


def test_a_worker_that_keeps_dying_at_once_is_given_up_on() -> None:
    started: list[float] = []

    def start() -> subprocess.Popen[bytes]:
        started.append(time.monotonic())
        return _process("raise SystemExit(3)")

    supervisor = WorkerSupervisor(start, _stop, steady_s=30, base_delay_s=0.2, max_quick_failures=3, poll_s=0.05)
    supervisor.launch(start())
    _until_given_up(supervisor)
    assert supervisor.gave_up is not None and "3 times in a row" in supervisor.gave_up
    assert "last status 3" in supervisor.gave_up
    assert len(started) == 3 and supervisor.restarts == 2
    gaps = [b - a for a, b in itertools.pairwise(started)]
    assert gaps[1] > gaps[0] + 0.1  # the wait doubles: 0.2 s, then 0.4 s


def test_a_worker_that_ran_steadily_is_restarted_and_stop_ends_the_new_one() -> None:
    runs: list[subprocess.Popen[bytes]] = []

    def start() -> subprocess.Popen[bytes]:
        runs.append(_process("import time; time.sleep(60)"))
        return runs[-1]

    supervisor = WorkerSupervisor(start, _stop, steady_s=0.0, base_delay_s=0.1, poll_s=0.05)
    supervisor.launch(start())
    for _ in range(3):  # each death after a steady run counts as the first: never given up
        runs[-1].kill()
        count = len(runs)
        deadline = time.monotonic() + 10
        while len(runs) == count and time.monotonic() < deadline:
            time.sleep(0.05)
    supervisor.stop()
    assert supervisor.restarts == 3 and supervisor.gave_up is None
    assert all(run.poll() is not None for run in runs)


def test_a_worker_that_cannot_be_started_again_counts_as_a_quick_death() -> None:
    calls: list[int] = []

    def start() -> subprocess.Popen[bytes]:
        calls.append(1)
        if len(calls) == 1:
            return _process("raise SystemExit(4)")
        raise OSError("exec failed")

    supervisor = WorkerSupervisor(start, _stop, steady_s=30, base_delay_s=0.05, max_quick_failures=3, poll_s=0.05)
    supervisor.launch(start())
    _until_given_up(supervisor)
    # The first death and two failed starts: given up, with no restart counted.
    assert supervisor.gave_up is not None and "3 times in a row" in supervisor.gave_up
    assert len(calls) == 3 and supervisor.restarts == 0
