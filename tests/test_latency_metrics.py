"""--metrics-config as tritonserver's: latency summaries with chosen quantiles, the duration
counters turned off, the first-response histogram; on a real server's /metrics."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import tritonclient.grpc as grpcclient

from shmserve.tests.serverproc import ServerProcess, build_repository
from shmserve.tests.simple_calls import infer_simple

LABELS = 'model="simple",version="1"'


def _value(page: str, series: str) -> float:
    found = re.search(rf"^{re.escape(series)} (\S+)$", page, re.MULTILINE)
    assert found is not None, (series, page)
    return float(found.group(1))


def test_summaries_histogram_and_no_counters(tmp_path: Path) -> None:
    repo = build_repository(tmp_path / "repo", ["simple"])
    with ServerProcess(repo, "--metrics-config", "summary_latencies=true",
                       "--metrics-config", "counter_latencies=false",
                       "--metrics-config", "histogram_latencies=true",
                       "--metrics-config", "summary_quantiles=0.5:0.05,0.99:0.001") as server:
        server.wait_ready()
        with grpcclient.InferenceServerClient(server.url) as client:
            for _ in range(5):
                infer_simple(client)
            queue_ns = client.get_inference_statistics("simple").model_stats[0] \
                .inference_stats.queue.ns
        page = server.metrics_page()
    assert "nv_inference_request_duration_us" not in page
    assert "# TYPE nv_inference_request_summary_us summary" in page
    for family in ("request", "queue", "compute_input", "compute_infer", "compute_output"):
        name = f"nv_inference_{family}_summary_us"
        assert _value(page, f"{name}_count{{{LABELS}}}") == 5
        low = _value(page, f'{name}{{{LABELS},quantile="0.5"}}')
        high = _value(page, f'{name}{{{LABELS},quantile="0.99"}}')
        assert 0 <= low <= high
        assert f'{name}{{{LABELS},quantile="0.9"}}' not in page   # only the ones asked for
    # The summary's sum is the counter's: the statistics' queue time, in microseconds.
    queue_sum = _value(page, f"nv_inference_queue_summary_us_sum{{{LABELS}}}")
    assert abs(queue_sum - queue_ns / 1000) < 1
    histogram = "nv_inference_first_response_histogram_ms"
    assert _value(page, f"{histogram}_count{{{LABELS}}}") == 5
    assert _value(page, f'{histogram}{{{LABELS},le="+Inf"}}') == 5
    assert _value(page, f'{histogram}{{{LABELS},le="5000"}}') == 5


def test_default_metrics_keep_the_counters_only(tmp_path: Path) -> None:
    repo = build_repository(tmp_path / "repo", ["simple"])
    with ServerProcess(repo) as server:
        server.wait_ready()
        page = server.metrics_page()
    assert "nv_inference_request_duration_us" in page
    assert "summary_us" not in page and "first_response_histogram" not in page


def test_a_bad_metrics_setting_stops_the_start(tmp_path: Path) -> None:
    repo = build_repository(tmp_path / "repo", ["simple"])
    done = subprocess.run([sys.executable, "-m", "shmserve.daemon", "serve",
                           "--model-repository", str(repo), "--metrics-config",
                           "summary_quantiles=median"],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 2
    assert "invalid summary quantile 'median'" in done.stderr
