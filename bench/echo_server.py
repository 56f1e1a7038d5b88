"""Ceiling: a bare grpc.aio unary server on uvloop that answers ModelInfer with a canned response.

It is the most a Python gRPC frontend can do on this host: no validation, no scheduling, no
worker hop. Requests are taken as bytes (no protobuf parsing) and the answer is a pre-serialized
``ModelInferResponse`` looked up by the request's length. The first request of an unseen length
is parsed once to build that answer: each input comes back as an output of the same datatype
and shape (identity), named after the requested outputs when there are any, so the response has
the size the real model's would have. Inputs or outputs in shared memory come back as metadata
only, as a real server answers them.

To let perf_analyzer drive it too, it also answers ServerLive/ServerReady, ModelMetadata and
ModelConfig for the models of ``--model-repository`` and accepts (and ignores) system shared
memory registrations.

Run as ``python -m bench.echo_server --port 0``; it prints ``ECHO READY <port>`` once serving.
"""

from __future__ import annotations

import argparse
import asyncio
import signal
import sys
from pathlib import Path
from typing import Any

import grpc
from google.protobuf import text_format

from shmserve.protos import shmserve_model_config_pb2 as mc
from shmserve.protos import shmserve_service_pb2 as pb

SERVICE = "inference.GRPCInferenceService"
INT32_MAX = 2**31 - 1
GRPC_OPTIONS = [
    ("grpc.max_send_message_length", INT32_MAX),
    ("grpc.max_receive_message_length", INT32_MAX),
    ("grpc.so_reuseport", 0),
]
_SHM_KEYS = ("shared_memory_region", "shared_memory_byte_size", "shared_memory_offset")
_DATATYPES = {value: name[len("TYPE_"):] for name, value in mc.DataType.items()}
_DATATYPES[mc.TYPE_STRING] = "BYTES"


def canned_response(request_bytes: bytes) -> bytes:
    """The identity-shaped answer to one serialized ModelInferRequest."""
    request = pb.ModelInferRequest.FromString(request_bytes)
    response = pb.ModelInferResponse(model_name=request.model_name,
                                     model_version=request.model_version or "1", id=request.id)
    requested = list(request.outputs)
    raw = list(request.raw_input_contents)
    raw_index = 0
    for index, tensor in enumerate(request.inputs):
        in_shm = "shared_memory_region" in tensor.parameters
        data = b""
        if not in_shm and raw_index < len(raw):
            data = raw[raw_index]
            raw_index += 1
        name = requested[index].name if index < len(requested) else f"OUTPUT{index}"
        out_shm = index < len(requested) and "shared_memory_region" in requested[index].parameters
        output = response.outputs.add(name=name, datatype=tensor.datatype, shape=tensor.shape)
        if out_shm:
            region = requested[index].parameters["shared_memory_region"].string_param
            output.parameters["shared_memory_region"].string_param = region
            data = b""
        response.raw_output_contents.append(data)
    return response.SerializeToString()


class EchoService:
    def __init__(self, repository: Path | None) -> None:
        self._canned: dict[int, bytes] = {}
        self._configs: dict[str, mc.ModelConfig] = {}
        if repository is not None and repository.is_dir():
            for config_path in sorted(repository.glob("*/config.pbtxt")):
                config = text_format.Parse(config_path.read_text(), mc.ModelConfig())
                config.name = config.name or config_path.parent.name
                self._configs[config.name] = config

    async def model_infer(self, request: bytes, context: grpc.aio.ServicerContext) -> bytes:
        answer = self._canned.get(len(request))
        if answer is None:
            answer = canned_response(request)
            self._canned[len(request)] = answer
        return answer

    async def server_live(self, request: bytes, context: grpc.aio.ServicerContext) -> bytes:
        return pb.ServerLiveResponse(live=True).SerializeToString()

    async def server_ready(self, request: bytes, context: grpc.aio.ServicerContext) -> bytes:
        return pb.ServerReadyResponse(ready=True).SerializeToString()

    async def server_metadata(self, request: bytes, context: grpc.aio.ServicerContext) -> bytes:
        return pb.ServerMetadataResponse(
            name="echo", version="0", extensions=["system_shared_memory"]).SerializeToString()

    async def model_ready(self, request: bytes, context: grpc.aio.ServicerContext) -> bytes:
        name = pb.ModelReadyRequest.FromString(request).name
        return pb.ModelReadyResponse(ready=name in self._configs).SerializeToString()

    async def model_metadata(self, request: bytes, context: grpc.aio.ServicerContext) -> bytes:
        name = pb.ModelMetadataRequest.FromString(request).name
        config = self._configs.get(name)
        if config is None:
            await context.abort(grpc.StatusCode.NOT_FOUND, f"no model '{name}'")
            raise AssertionError("unreachable")
        batch = [-1] if config.max_batch_size > 0 else []
        response = pb.ModelMetadataResponse(name=name, platform=config.backend, versions=["1"])
        for tensor in config.input:
            response.inputs.add(name=tensor.name, datatype=_DATATYPES[tensor.data_type],
                                shape=batch + list(tensor.dims))
        for tensor in config.output:
            response.outputs.add(name=tensor.name, datatype=_DATATYPES[tensor.data_type],
                                 shape=batch + list(tensor.dims))
        return response.SerializeToString()

    async def model_config(self, request: bytes, context: grpc.aio.ServicerContext) -> bytes:
        name = pb.ModelConfigRequest.FromString(request).name
        config = self._configs.get(name)
        if config is None:
            await context.abort(grpc.StatusCode.NOT_FOUND, f"no model '{name}'")
            raise AssertionError("unreachable")
        return pb.ModelConfigResponse(config=config).SerializeToString()

    async def shm_register(self, request: bytes, context: grpc.aio.ServicerContext) -> bytes:
        return pb.SystemSharedMemoryRegisterResponse().SerializeToString()

    async def shm_unregister(self, request: bytes, context: grpc.aio.ServicerContext) -> bytes:
        return pb.SystemSharedMemoryUnregisterResponse().SerializeToString()

    async def shm_status(self, request: bytes, context: grpc.aio.ServicerContext) -> bytes:
        return pb.SystemSharedMemoryStatusResponse().SerializeToString()

    def handler(self) -> grpc.GenericRpcHandler:
        methods: dict[str, Any] = {
            "ModelInfer": self.model_infer,
            "ServerLive": self.server_live,
            "ServerReady": self.server_ready,
            "ServerMetadata": self.server_metadata,
            "ModelReady": self.model_ready,
            "ModelMetadata": self.model_metadata,
            "ModelConfig": self.model_config,
            "SystemSharedMemoryRegister": self.shm_register,
            "SystemSharedMemoryUnregister": self.shm_unregister,
            "SystemSharedMemoryStatus": self.shm_status,
        }
        # No (de)serializers: bytes in, bytes out.
        return grpc.method_handlers_generic_handler(
            SERVICE, {name: grpc.unary_unary_rpc_method_handler(method)
                      for name, method in methods.items()})


async def serve(host: str, port: int, repository: Path | None) -> None:
    server = grpc.aio.server(options=GRPC_OPTIONS)
    server.add_generic_rpc_handlers([EchoService(repository).handler()])
    bound = server.add_insecure_port(f"{host}:{port}")
    await server.start()
    print(f"ECHO READY {bound}", flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    await stop.wait()
    await server.stop(grace=0.5)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--model-repository", type=Path, default=None,
                        help="answer ModelMetadata/ModelConfig for these models")
    args = parser.parse_args(argv)
    import uvloop
    uvloop.run(serve(args.host, args.port, args.model_repository))
    return 0


if __name__ == "__main__":
    sys.exit(main())
