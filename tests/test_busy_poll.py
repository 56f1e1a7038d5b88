"""The worker's adaptive busy polling (workers/busy_poll.py) on a real socketpair."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator

import pytest

from shmserve.workers.busy_poll import BusyPoll


@pytest.fixture
def pair() -> Iterator[tuple[socket.socket, socket.socket]]:
    left, right = socket.socketpair()
    yield left, right
    left.close()
    right.close()


def _send_later(sock: socket.socket, delay: float, data: bytes) -> threading.Thread:
    thread = threading.Thread(target=lambda: (time.sleep(delay), sock.sendall(data)))
    thread.start()
    return thread


def test_frames_arriving_within_the_budget_keep_it(pair: tuple[socket.socket, socket.socket]
                                                   ) -> None:
    reader, writer = pair
    poll = BusyPoll(reader, 200_000)  # 200 ms: generous, so a loaded machine cannot miss it
    thread = _send_later(writer, 0.02, b"frame")
    assert poll.recv(64) == b"frame"
    thread.join()
    assert poll.budget_ns == 200_000_000


def test_a_budget_that_runs_out_halves_down_to_nothing(
        pair: tuple[socket.socket, socket.socket]) -> None:
    reader, writer = pair
    poll = BusyPoll(reader, 40)
    budgets = []
    for _ in range(4):
        thread = _send_later(writer, 0.05, b"x")  # far beyond 40 µs: every poll runs out
        assert poll.recv(64) == b"x"              # and the blocking recv still gets it
        thread.join()
        budgets.append(poll.budget_ns)
    assert budgets[:2] == [20_000, 10_000]
    assert budgets[2:] == [0, 0]                  # under 10 µs: no more polling


def test_a_short_blocking_wait_turns_polling_back_on(
        pair: tuple[socket.socket, socket.socket]) -> None:
    reader, writer = pair
    poll = BusyPoll(reader, 100_000)  # 100 ms
    poll.budget_ns = 0                 # as after a quiet spell
    writer.sendall(b"ready")           # already there: the blocking wait is short
    assert poll.recv(64) == b"ready"
    assert poll.budget_ns == 100_000_000


def test_disabled_polling_only_blocks(pair: tuple[socket.socket, socket.socket]) -> None:
    reader, writer = pair
    poll = BusyPoll(reader, 0)
    writer.sendall(b"y")
    assert poll.recv(64) == b"y"
    assert poll.budget_ns == 0
    writer.close()
    assert poll.recv(64) == b""        # EOF


def test_recv_waiting_never_blocks(pair: tuple[socket.socket, socket.socket]) -> None:
    reader, writer = pair
    poll = BusyPoll(reader, 50)
    started = time.monotonic()
    assert poll.recv_waiting(64) == b""            # nothing there: returns at once
    assert time.monotonic() - started < 1.0
    writer.sendall(b"cancel")
    assert poll.recv_waiting(64) == b"cancel"
