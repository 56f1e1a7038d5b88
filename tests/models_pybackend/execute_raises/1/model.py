"""execute() raises: every request of the batch must fail with the exception text."""

from typing import Any


class TritonPythonModel:
    def execute(self, requests: list[Any]) -> list[Any]:
        raise ValueError(f"boom: cannot handle {len(requests)} request(s)")

    def finalize(self) -> None:
        raise OSError("finalize failed too")
