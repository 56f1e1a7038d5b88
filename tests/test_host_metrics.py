"""CPU and GPU metrics on /metrics (Triton's nv_cpu_* and nv_gpu_* families), from a real
server. The CPU figures are checked against /proc. The GPU figures come from whatever
``nvidia-smi`` is first on the server's PATH: here a stand-in script that prints what the real
tool prints for ``--query-gpu`` (two GPUs), or on a GPU host the real one (marked ``gpu``).
"""

from __future__ import annotations

import os
import re
import stat
import textwrap
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from shmserve.daemon.host_metrics import read_memory
from shmserve.tests.serverproc import ServerProcess, build_repository

# What `nvidia-smi --query-gpu=uuid,utilization.gpu,memory.total,memory.used,power.draw,
# power.limit --format=csv,noheader,nounits` prints: MiB and watts; "[N/A]" where a GPU
# does not report a value.
FAKE_NVIDIA_SMI = """\
    #!/bin/sh
    case "$1" in
      --query-gpu=uuid,utilization.gpu,memory.total,memory.used,power.draw,power.limit)
        echo "GPU-11111111-2222-3333-4444-555555555555, 37, 81559, 1024, 250.50, 700.00"
        echo "GPU-66666666-7777-8888-9999-000000000000, 0, 81559, 0, [N/A], [N/A]"
        ;;
      *) exit 2 ;;
    esac
"""


def _series(page: str, name: str) -> dict[str, float]:
    """The samples of one family: labels text -> value."""
    return {match.group(1) or "": float(match.group(2)) for match in
            re.finditer(rf"^{name}(\{{[^}}]*\}})? (\S+)$", page, re.MULTILINE)}


def _fake_smi(folder: Path) -> dict[str, str]:
    script = folder / "nvidia-smi"
    script.write_text(textwrap.dedent(FAKE_NVIDIA_SMI))
    script.chmod(script.stat().st_mode | stat.S_IXUSR)
    return {"PATH": f"{folder}{os.pathsep}{os.environ.get('PATH', '')}"}


def test_cpu_and_gpu_families(tmp_path: Path) -> None:
    repo = build_repository(tmp_path / "repo", ["simple"])
    with ServerProcess(repo, "--metrics-interval-ms", "200",
                       env=_fake_smi(tmp_path)) as server:
        server.wait_ready()
        time.sleep(0.5)  # a poll after the first one: utilization over an interval
        page = server.metrics_page()
        assert "# TYPE nv_cpu_utilization gauge" in page
        utilization = _series(page, "nv_cpu_utilization")[""]
        assert 0.0 <= utilization <= 1.0
        total, used = (_series(page, name)[""] for name in ("nv_cpu_memory_total_bytes",
                                                           "nv_cpu_memory_used_bytes"))
        memory = read_memory()
        assert memory is not None and total == memory[0]
        assert 0 < used <= total

        first = '{gpu_uuid="GPU-11111111-2222-3333-4444-555555555555"}'
        second = '{gpu_uuid="GPU-66666666-7777-8888-9999-000000000000"}'
        assert _series(page, "nv_gpu_utilization") == {first: 0.37, second: 0.0}
        assert _series(page, "nv_gpu_memory_total_bytes") == {first: 81559 * 2**20,
                                                              second: 81559 * 2**20}
        assert _series(page, "nv_gpu_memory_used_bytes") == {first: 1024 * 2**20, second: 0}
        # A GPU without power readings has no power samples (Triton leaves them out too).
        assert _series(page, "nv_gpu_power_usage") == {first: 250.5}
        assert _series(page, "nv_gpu_power_limit") == {first: 700.0}
        assert "# TYPE nv_energy_consumption counter" in page
        energy = _series(page, "nv_energy_consumption")
        assert energy[first] > 0 and energy[second] == 0
        time.sleep(0.5)
        assert _series(server.metrics_page(), "nv_energy_consumption")[first] > energy[first]
        # Only /metrics is served.
        port = re.search(r"Started Metrics Service at [\d.]+:(\d+)", server.log())
        assert port is not None
        with pytest.raises(urllib.error.HTTPError) as missing:
            urllib.request.urlopen(f"http://127.0.0.1:{port.group(1)}/other", timeout=10)
        assert missing.value.code == 404
        missing.value.close()


def test_families_can_be_turned_off(tmp_path: Path) -> None:
    repo = build_repository(tmp_path / "repo", ["simple"])
    with ServerProcess(repo, "--allow-cpu-metrics", "false", "--allow-gpu-metrics", "false",
                       env=_fake_smi(tmp_path)) as server:
        server.wait_ready()
        page = server.metrics_page()
    assert "nv_inference_count" in page
    assert "nv_cpu_" not in page and "nv_gpu_" not in page and "nv_energy" not in page


def test_a_failing_nvidia_smi_costs_nothing_else(tmp_path: Path) -> None:
    script = tmp_path / "nvidia-smi"
    script.write_text("#!/bin/sh\necho 'NVIDIA-SMI has failed' >&2\nexit 9\n")
    script.chmod(0o755)
    repo = build_repository(tmp_path / "repo", ["simple"])
    with ServerProcess(repo, env={"PATH": f"{tmp_path}{os.pathsep}{os.environ['PATH']}"}
                       ) as server:
        server.wait_ready()
        page = server.metrics_page()
        assert "nv_gpu_" not in page and "nv_cpu_utilization" in page
        assert "GPU metrics are not available: nvidia-smi failed (exit 9" in server.log()


@pytest.mark.gpu
def test_real_gpus_are_reported(tmp_path: Path) -> None:
    repo = build_repository(tmp_path / "repo", ["simple"])
    with ServerProcess(repo) as server:
        server.wait_ready()
        page = server.metrics_page()
    totals = _series(page, "nv_gpu_memory_total_bytes")
    assert totals and all(label.startswith('{gpu_uuid="GPU-') and value > 0
                          for label, value in totals.items())
