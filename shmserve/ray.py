"""Ray Serve integration (``pip install 'shmserve[ray]'``): one shmserve per node, Ray Serve
replicas in front of it, scaled by Ray's own autoscaling.

    from ray import serve
    import shmserve.ray

    app = shmserve.ray.deployment("/models", model_control_mode="none")
    handle = serve.run(app)
    out = handle.infer.remote("simple", {"INPUT0": x, "INPUT1": x}).result()

- ``NodeServer``: a Ray actor that runs ``shmserve.Server`` (the embedded server: a child
  supervisor process, its fork server and workers, tied to the actor's life). One per node,
  found by name (``shmserve-node-<node id>``), pinned to its node, detached so that replicas
  coming and going do not take it down; ``shutdown_node_servers()`` ends them all (so does the
  end of the Ray cluster).
- ``ShmserveDeployment``: the Serve deployment. Each replica finds (or starts) its node's
  server and forwards handle calls to it through the local channel: the replica and the server
  share the node, so tensors go through shared memory (memfd regions), not a socket copy.
  From the caller to the replica, Ray's object store carries the arrays; on the same node that
  is shared memory too (NumPy arrays are read zero-copy from the plasma store).
- ``local_client()``: a caller running on a node that has a server can skip Ray's hop and use
  the server's local channel directly.

Replica counts follow Ray Serve's autoscaling (``autoscaling_config``: ongoing requests per
replica); the node servers follow the replicas' placement. The models' workers are processes
of the node server, outside Ray's CPU accounting: reserve for them with ``ray_actor_options``
or the node's ``num_cpus``.
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np
import ray
from ray import serve
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from shmserve.client import AsyncClient, Client
from shmserve.embedded import Server

NAMESPACE = "shmserve"
# Replicas scale on ongoing requests: a replica mostly waits on the node's server, so a few
# concurrent requests each keep the server's dynamic batcher fed.
DEFAULT_AUTOSCALING: dict[str, Any] = {
    "min_replicas": 1,
    "max_replicas": 4,
    "target_ongoing_requests": 8,
}


def node_server_name(node_id: str) -> str:
    return f"shmserve-node-{node_id}"


@ray.remote(num_cpus=0, max_restarts=-1)
class NodeServer:
    """The node's shmserve (restarted by Ray if its process dies)."""

    def __init__(self, model_repository: str, settings: dict[str, Any]) -> None:
        self._server = Server(model_repository, **settings).start()

    def socket_path(self) -> str:
        return self._server.socket_path

    def pid(self) -> int | None:
        return self._server.pid

    def stop(self) -> None:
        self._server.close()


def _this_node() -> str:
    return str(ray.get_runtime_context().get_node_id())


def node_server(model_repository: str, settings: dict[str, Any] | None = None) -> Any:
    """This node's ``NodeServer`` handle, started on first use with these settings (a server
    already running keeps its own)."""
    node = _this_node()
    return NodeServer.options(  # type: ignore[attr-defined]
        name=node_server_name(node), namespace=NAMESPACE, get_if_exists=True,
        lifetime="detached",
        scheduling_strategy=NodeAffinitySchedulingStrategy(node_id=node, soft=False),
    ).remote(os.path.abspath(model_repository), dict(settings or {}))


def local_client(**options: Any) -> Client:
    """A client on the local channel of this node's server (raises ValueError if the node
    has none): for callers on the node, without Ray's hop."""
    try:
        server = ray.get_actor(node_server_name(_this_node()), namespace=NAMESPACE)
    except ValueError:
        raise ValueError("no shmserve node server runs on this node") from None
    return Client("local://" + ray.get(server.socket_path.remote()), **options)


def shutdown_node_servers() -> list[str]:
    """Stop every node's server; returns the names of those stopped."""
    stopped = []
    for node in ray.nodes():
        name = node_server_name(node["NodeID"])
        try:
            server = ray.get_actor(name, namespace=NAMESPACE)
        except ValueError:
            continue
        ray.get(server.stop.remote())
        ray.kill(server)
        stopped.append(name)
    return stopped


@serve.deployment(autoscaling_config=DEFAULT_AUTOSCALING, max_ongoing_requests=32)
class ShmserveDeployment:
    """Forwards handle calls to the node's shmserve over its local channel."""

    def __init__(self, model_repository: str, settings: dict[str, Any]) -> None:
        self._server = node_server(model_repository, settings)
        self._socket = ray.get(self._server.socket_path.remote())
        self._client: AsyncClient | None = None

    def _channel(self) -> AsyncClient:
        if self._client is None:  # grpc.aio binds a client to the running loop
            self._client = AsyncClient("local://" + self._socket)
        return self._client

    async def infer(self, model: str, inputs: dict[str, np.ndarray],
                    outputs: list[str] | None = None, version: str = "",
                    parameters: dict[str, Any] | None = None) -> dict[str, np.ndarray]:
        """One inference: NumPy arrays in, NumPy arrays out (by output name)."""
        result = await self._channel().infer(model, inputs, outputs, version=version,
                                             parameters=parameters)
        return dict(result)

    async def is_model_ready(self, model: str, version: str = "") -> bool:
        return bool(await self._channel().is_model_ready(model, version))

    async def node_server_pid(self) -> int | None:
        """The pid of the shmserve this replica forwards to (one per node)."""
        return await self._server.pid.remote()


def deployment(model_repository: str, *, autoscaling_config: dict[str, Any] | None = None,
               ray_actor_options: dict[str, Any] | None = None,
               **settings: Any) -> Any:
    """A Serve application: ``ShmserveDeployment`` on ``model_repository`` (a path valid on
    every node), the node servers started with ``settings``: shmserve serve's, by name, and
    shmserve.Server's ``log_file`` and ``startup_timeout``. ``autoscaling_config`` is Ray
    Serve's (default ``DEFAULT_AUTOSCALING``)."""
    Server(model_repository, **settings)  # a wrong name or value fails here, not on a node
    options: dict[str, Any] = {"autoscaling_config": autoscaling_config or DEFAULT_AUTOSCALING}
    if ray_actor_options is not None:
        options["ray_actor_options"] = ray_actor_options
    return ShmserveDeployment.options(**options).bind(  # type: ignore[attr-defined]
        os.path.abspath(model_repository), settings)
