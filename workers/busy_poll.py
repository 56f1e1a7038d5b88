"""Adaptive busy polling of the worker's control socket.

A worker that blocks in recv() between frames goes to sleep, and waking it (and the CPU it
slept on: on a VM, a halted vCPU) costs tens of microseconds per frame, more than a quick
model's execute. While frames arrive back to back, the worker instead polls the socket for a
short while before blocking. The budget adapts: a poll that catches a frame keeps the full
budget; one that runs out halves it, down to nothing, so an instance whose frames come further
apart than the budget (or rarely) does not spin at all. A blocking wait shorter than the
budget turns polling back on.
"""

from __future__ import annotations

import select
import socket
import time

_MIN_BUDGET_NS = 10_000


class BusyPoll:
    def __init__(self, sock: socket.socket, max_us: int) -> None:
        self._sock = sock
        self._max_ns = max(0, max_us) * 1000
        self.budget_ns = self._max_ns
        self._poller = select.poll()
        self._poller.register(sock.fileno(), select.POLLIN)

    def recv(self, size: int) -> bytes:
        """The next chunk from the socket (b"" at EOF or on error), polling first."""
        if self.budget_ns and self._spin():
            return self._recv(size)
        started = time.perf_counter_ns()
        chunk = self._recv(size)
        if not self.budget_ns and self._max_ns and \
                time.perf_counter_ns() - started < self._max_ns:
            self.budget_ns = self._max_ns
        return chunk

    def recv_waiting(self, size: int) -> bytes:
        """What already arrived, without waiting (b"" when nothing did, at EOF or on error:
        the blocking ``recv`` tells those apart)."""
        if not self._poller.poll(0):
            return b""
        try:
            return self._sock.recv(size, socket.MSG_DONTWAIT)
        except OSError:
            return b""

    def _spin(self) -> bool:
        """Poll until readable (True) or the budget ran out (False, and a smaller budget)."""
        clock = time.perf_counter_ns
        poll = self._poller.poll
        deadline = clock() + self.budget_ns
        while not poll(0):
            if clock() >= deadline:
                budget = self.budget_ns // 2
                self.budget_ns = budget if budget >= _MIN_BUDGET_NS else 0
                return False
        self.budget_ns = self._max_ns
        return True

    def _recv(self, size: int) -> bytes:
        try:
            return self._sock.recv(size)
        except OSError:
            return b""
