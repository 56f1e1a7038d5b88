"""Server CPU per request of the gRPC and HTTP doors against their bare libraries, same run.

    python -m bench.door_cpu [--quick] [--requests N] [--concurrency C] [--rounds R]
                             [--doors grpc,http,http-json,http-frontends] [--profile DIR]

For each server (shmserve gRPC `simple`, the bare grpc.aio parse-only echo of
bench/echo_server.py, shmserve HTTP `simple` with binary and with JSON tensors, the bare
aiohttp server of bench/http_library.py given the same requests, and shmserve HTTP with
`--grpc-frontends 2`) a client process keeps C requests in flight until N are answered; rows
take turns for R rounds and the table gives medians: the server's CPU per request
(supervisor process only for shmserve: the worker, and frontend processes, are in the
"all processes" column), its ratio to the bare library's, and requests/s. CPU per request,
not wall throughput, is what to compare on a loaded host. ``--profile DIR`` also records the
shmserve supervisor with py-spy (``--native``) into DIR/<door>.txt (collapsed stacks) when
py-spy is installed.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any

import numpy as np

from bench.http_library import REQUEST as JSON_REQUEST
from bench.procstat import process_cpu_seconds, tree_cpu_seconds
from shmserve.protos import shmserve_service_pb2 as pb
from shmserve.tests.serverproc import EXAMPLES, ServerProcess, build_repository, free_port

SERVICE = "/inference.GRPCInferenceService/ModelInfer"


def simple_request() -> bytes:
    request = pb.ModelInferRequest(model_name="simple")
    for name in ("INPUT0", "INPUT1"):
        request.inputs.add(name=name, datatype="INT32", shape=[1, 16])
        request.raw_input_contents.append(np.arange(16, dtype=np.int32).tobytes())
    return request.SerializeToString()


def http_request() -> tuple[bytes, bytes]:
    header = (b'{"inputs":[{"name":"INPUT0","datatype":"INT32","shape":[1,16],'
              b'"parameters":{"binary_data_size":64}},{"name":"INPUT1","datatype":"INT32",'
              b'"shape":[1,16],"parameters":{"binary_data_size":64}}],'
              b'"outputs":[{"name":"OUTPUT0","parameters":{"binary_data":true}},'
              b'{"name":"OUTPUT1","parameters":{"binary_data":true}}]}')
    body = header + np.arange(16, dtype=np.int32).tobytes() * 2
    head = (b"POST /v2/models/simple/infer HTTP/1.1\r\nHost: bench\r\n"
            b"Inference-Header-Content-Length: %d\r\nContent-Length: %d\r\n\r\n"
            % (len(header), len(body)))
    return head + body, header


async def _grpc_load(url: str, total: int, concurrency: int) -> float:
    import grpc
    message = simple_request()
    async with grpc.aio.insecure_channel(url) as channel:
        call = channel.unary_unary(SERVICE)
        left = total

        async def one() -> None:
            nonlocal left
            while left > 0:
                left -= 1
                await call(message)

        started = time.perf_counter()
        await asyncio.gather(*(one() for _ in range(concurrency)))
        return time.perf_counter() - started


async def _http_load(port: int, total: int, concurrency: int, request: bytes) -> float:
    left = total

    async def one() -> None:
        nonlocal left
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        try:
            while left > 0:
                left -= 1
                writer.write(request)
                head = await reader.readuntil(b"\r\n\r\n")
                length = 0
                for line in head.split(b"\r\n"):
                    if line.lower().startswith(b"content-length:"):
                        length = int(line.split(b":")[1])
                body = await reader.readexactly(length)
                if not head.startswith(b"HTTP/1.1 200"):
                    raise RuntimeError(head + body)
        finally:
            writer.close()

    started = time.perf_counter()
    await asyncio.gather(*(one() for _ in range(concurrency)))
    return time.perf_counter() - started


def _measure(pid: int, load: object, total: int) -> tuple[float, float, float]:
    """(server CPU µs per request, the same with its descendants, requests/s) of ``load``
    (a coroutine)."""
    before, tree_before = process_cpu_seconds(pid), tree_cpu_seconds(pid)
    wall = asyncio.run(load)  # type: ignore[arg-type]
    used = process_cpu_seconds(pid) - before
    tree = tree_cpu_seconds(pid) - tree_before
    return used / total * 1e6, tree / total * 1e6, total / wall


def _median(values: list[float]) -> float:
    return sorted(values)[len(values) // 2]


def _py_spy(pid: int, seconds: float, target: Path) -> subprocess.Popen[bytes] | None:
    spy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    if not Path(spy).exists():
        return None
    return subprocess.Popen([spy, "record", "--native", "--format", "raw", "--pid", str(pid),
                             "--duration", str(int(seconds)), "--output", str(target)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="2,000 requests per row")
    parser.add_argument("--requests", type=int, default=20_000)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--profile", type=Path, default=None)
    parser.add_argument("--doors", default="grpc,http,http-json,http-frontends",
                        help="which of grpc, http, http-json, http-frontends")
    args = parser.parse_args()
    total = 2_000 if args.quick else args.requests
    warm = max(200, total // 10)
    doors = args.doors.split(",")
    # name -> (door, pid, load)
    rows: list[tuple[str, str, int, Callable[[int], Coroutine[Any, Any, float]]]] = []
    samples: dict[str, list[tuple[float, float, float]]] = {}
    with tempfile.TemporaryDirectory() as scratch, contextlib.ExitStack() as stack:
        repo = build_repository(Path(scratch) / "repo", ["simple"])
        echo_port = free_port()
        echo = subprocess.Popen([sys.executable, "-m", "bench.echo_server", "--port",
                                 str(echo_port), "--model-repository", str(EXAMPLES)],
                                stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
        stack.callback(_stop, echo)
        aio_port = free_port()
        bare = subprocess.Popen([sys.executable, "-m", "bench.http_library", "bare", "aiohttp",
                                 str(aio_port)], stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL)
        stack.callback(_stop, bare)
        assert echo.stdout is not None
        echo.stdout.readline()  # ECHO READY
        server = stack.enter_context(ServerProcess(repo))
        server.wait_ready()
        binary, _ = http_request()
        concurrency = args.concurrency

        def http(port: int, request: bytes) -> Callable[[int], Coroutine[Any, Any, float]]:
            return lambda n: _http_load(port, n, concurrency, request)

        rows += [
            ("grpc shmserve", "grpc", server.pid,
             lambda n: _grpc_load(server.url, n, concurrency)),
            ("grpc bare echo", "grpc", echo.pid,
             lambda n: _grpc_load(f"127.0.0.1:{echo_port}", n, concurrency)),
            ("http shmserve", "http", server.pid, http(server.http_port, binary)),
            ("http bare aiohttp", "http", bare.pid, http(aio_port, binary)),
            ("http-json shmserve", "http-json", server.pid, http(server.http_port, JSON_REQUEST)),
            ("http-json bare aiohttp", "http-json", bare.pid, http(aio_port, JSON_REQUEST))]
        if "http-frontends" in doors:
            frontends = stack.enter_context(ServerProcess(repo, "--grpc-frontends", "2"))
            frontends.wait_ready()
            rows += [("http-frontends shmserve", "http-frontends", frontends.pid,
                      http(frontends.http_port, binary)),
                     ("http-frontends bare aiohttp", "http-frontends", bare.pid,
                      http(aio_port, binary))]
        rows = [row for row in rows if row[1] in doors]
        for name, _, _, load in rows:
            asyncio.run(load(warm))
            samples[name] = []
        for round_index in range(args.rounds):
            for name, door, pid, load in rows:
                spy = None
                if args.profile is not None and round_index == 0 and name.endswith("shmserve"):
                    args.profile.mkdir(parents=True, exist_ok=True)
                    spy = _py_spy(pid, 10, args.profile / f"{door}.txt")
                    time.sleep(1.0)
                samples[name].append(_measure(pid, load(total), total))
                if spy is not None:
                    spy.wait(60)
    medians = {name: tuple(_median([sample[i] for sample in values]) for i in range(3))
               for name, values in samples.items()}
    reference = {door: medians[name][0] for name, door, _, _ in rows if "bare" in name}
    print(f"{'server':<28}{'CPU µs/request':>16}{'x bare CPU':>12}{'all processes':>15}"
          f"{'requests/s':>12}")
    for name, door, _, _ in rows:
        cpu_us, tree_us, rate = medians[name]
        print(f"{name:<28}{cpu_us:>16.0f}{cpu_us / reference[door]:>12.2f}{tree_us:>15.0f}"
              f"{rate:>12.0f}")
    if args.rounds > 1:
        print(f"(medians of {args.rounds} rounds of {total} requests, rows taking turns)")


def _stop(process: subprocess.Popen[bytes]) -> None:
    process.terminate()
    process.wait(10)


if __name__ == "__main__":
    main()
