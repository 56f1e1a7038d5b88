"""A DALI model's config completed from its pipeline (Triton's DALI backend auto-complete).

Runs in the throwaway auto-complete child of the fork server (workers/auto_complete.py), never
in the supervisor: a Python pipeline file is user code. A serialized ``model.dali`` needs no
DALI to be read; a ``dali.py`` needs DALI to be serialized.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from shmserve.workers.backends.dali.config_check import autofill_config
from shmserve.workers.backends.dali.model_file import load_pipeline
from shmserve.workers.backends.dali.pipeline_def import read_pipeline


def complete_config(config: dict[str, Any], version_path: str,
                    max_batch_size_given: bool) -> dict[str, Any]:
    """``config`` with inputs, outputs and max_batch_size filled in from the pipeline."""
    name = str(config.get("name") or Path(version_path).parent.name)
    loaded = load_pipeline(name, Path(version_path),
                           config.get("default_model_filename") or None, device_id=None)
    return autofill_config(config, read_pipeline(loaded.serialized), max_batch_size_given)
