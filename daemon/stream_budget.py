"""How much a stream may hold for a client that reads slower than its model produces.

Shared by the streaming doors (gRPC ModelStreamInfer, HTTP generate_stream): a stream holds
at most ``responses`` unread messages (0: any number) and ``nbytes`` unread bytes (0: any
amount). The first unread message is always admitted, however large, so one big response
never fails a stream on its own. Past either limit the door ends the stream with an error.
"""

from __future__ import annotations


class StreamBudget:
    __slots__ = ("held", "held_bytes", "nbytes", "responses")

    def __init__(self, responses: int, nbytes: int) -> None:
        self.responses = responses
        self.nbytes = nbytes
        self.held = 0
        self.held_bytes = 0

    def admit(self, size: int) -> bool:
        """Hold one more message of ``size`` bytes, unless that passes a limit."""
        if self.held and ((self.responses and self.held >= self.responses)
                          or (self.nbytes and self.held_bytes + size > self.nbytes)):
            return False
        self.held += 1
        self.held_bytes += size
        return True

    def released(self, size: int) -> None:
        """A message of ``size`` bytes was handed to the client's connection."""
        self.held -= 1
        self.held_bytes -= size

    def describe(self) -> str:
        """The limit that was passed, for the error text."""
        limits = []
        if self.responses:
            limits.append(f"{self.responses} responses (--stream-max-pending-responses)")
        if self.nbytes:
            limits.append(f"{self.nbytes} bytes (--stream-max-pending-bytes)")
        return " or ".join(limits)
