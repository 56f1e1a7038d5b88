"""initialize() raises: the load must fail with the exception text."""

from typing import Any


class TritonPythonModel:
    def initialize(self, args: dict[str, str]) -> None:
        raise RuntimeError("weights file weights.bin is corrupt")

    def execute(self, requests: list[Any]) -> list[Any]:
        raise AssertionError("never reached")
