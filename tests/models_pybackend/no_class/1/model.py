"""A model file that forgot its TritonPythonModel class."""

from typing import Any


class MyModel:
    def execute(self, requests: list[Any]) -> list[Any]:
        return []
