"""shmserve.ray on a local Ray instance: Serve replicas forward handle calls to one shmserve
per node through its local channel. Skipped without ray (the shmserve[ray] extra); about
30-60 s here (starting Ray and Serve is most of it)."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pytest

from shmserve.tests.serverproc import build_repository
from shmserve.workers.lineage import process_alive

ray = pytest.importorskip("ray")
serve = pytest.importorskip("ray.serve")
import shmserve.ray  # noqa: E402  (after the skip: it imports ray)

pytestmark = [pytest.mark.ray, pytest.mark.slow, pytest.mark.timeout(300),
              pytest.mark.filterwarnings("ignore::DeprecationWarning"),
              pytest.mark.filterwarnings("ignore::FutureWarning")]
X = np.arange(16, dtype=np.int32).reshape(1, 16)


def test_replicas_forward_to_one_server_per_node(tmp_path: Path) -> None:
    repository = build_repository(tmp_path / "models", ["simple"])
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        app = shmserve.ray.deployment(
            str(repository), autoscaling_config={"min_replicas": 2, "max_replicas": 2},
            ray_actor_options={"num_cpus": 0.5}, log_file=str(tmp_path / "server.log"))
        handle = serve.run(app, name="shmserve", route_prefix=None)
        out = handle.infer.remote("simple", {"INPUT0": X, "INPUT1": X}).result()
        np.testing.assert_array_equal(out["OUTPUT0"], X + X)
        np.testing.assert_array_equal(out["OUTPUT1"], X - X)
        status = serve.status().applications["shmserve"].deployments["ShmserveDeployment"]
        assert status.replica_states.get("RUNNING") == 2
        # Both replicas (requests are spread over them) forward to the node's one server.
        servers = {handle.node_server_pid.remote().result() for _ in range(12)}
        assert len(servers) == 1
        (supervisor,) = servers
        # A caller on the node can use the server's local channel directly.
        with shmserve.ray.local_client() as client:
            direct = client.infer("simple", {"INPUT0": X, "INPUT1": X})
            assert client.transport == "shm"
        np.testing.assert_array_equal(direct["OUTPUT0"], X + X)
        serve.shutdown()
        assert len(shmserve.ray.shutdown_node_servers()) == 1
        deadline = time.monotonic() + 30
        while process_alive(supervisor) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not process_alive(supervisor)
    finally:
        serve.shutdown()
        ray.shutdown()
