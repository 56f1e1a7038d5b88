"""Restricted protocol groups, one rule for every door: tritonserver's
``--grpc-restricted-protocol`` and ``--http-restricted-api``
(``<groups>:<key>=<value>``; the groups are settings.PROTOCOL_GROUPS). A call of a restricted
group must carry the header the rule names with the rule's value: over gRPC the metadata key
``triton-grpc-protocol-<key>``, over HTTP the header ``<key>`` itself.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

GRPC_HEADER_PREFIX = "triton-grpc-protocol-"

Rule = tuple[set[str], str, str]  # (groups, key, value), as settings.parse_restriction gives


@dataclass(frozen=True, slots=True)
class Restriction:
    header: str   # as the rule names it (and error texts quote it)
    value: str

    def allows(self, header_value: Callable[[str], str | None]) -> bool:
        """``header_value(name)``: the call's value of header ``name`` (asked in lower case:
        gRPC metadata keys are, HTTP header names compare so), or None."""
        return header_value(self.header.lower()) == self.value


def restriction_for(rules: Sequence[Rule], group: str, header_prefix: str = ""
                    ) -> Restriction | None:
    """The restriction on ``group`` (the first rule naming it, as tritonserver takes it), or
    None when the group is open."""
    for groups, key, value in rules:
        if group in groups:
            return Restriction(header_prefix + key, value)
    return None
