"""Server CPU per request of the gRPC and HTTP doors against their bare libraries, same run.

    python -m bench.door_cpu [--quick] [--requests N] [--concurrency C] [--profile DIR]

For each server (shmserve gRPC `simple`, the bare grpc.aio parse-only echo of
bench/echo_server.py, shmserve HTTP `simple` binary, the bare aiohttp server of
bench/http_library.py) a client process keeps C requests in flight until N are answered; the
table gives the server's CPU per request (supervisor process only for shmserve: the worker
is reported apart) and the ratio to the bare library's. CPU per request, not wall throughput,
is what to compare on a loaded host. ``--profile DIR`` also records the shmserve supervisor
with py-spy (``--native``) into DIR/<door>.txt (collapsed stacks) when py-spy is installed.
"""

from __future__ import annotations

import argparse
import asyncio
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from bench.procstat import process_cpu_seconds
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


def _measure(pid: int, load: object, total: int) -> tuple[float, float]:
    """(server CPU µs per request, requests/s) of ``load`` (a coroutine)."""
    before = process_cpu_seconds(pid)
    wall = asyncio.run(load)  # type: ignore[arg-type]
    used = process_cpu_seconds(pid) - before
    return used / total * 1e6, total / wall


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
    parser.add_argument("--profile", type=Path, default=None)
    parser.add_argument("--doors", default="grpc,http", help="grpc, http or both")
    args = parser.parse_args()
    total = 2_000 if args.quick else args.requests
    warm = max(200, total // 10)
    rows: list[tuple[str, float, float]] = []
    with tempfile.TemporaryDirectory() as scratch:
        repo = build_repository(Path(scratch) / "repo", ["simple"])
        echo_port = free_port()
        echo = subprocess.Popen([sys.executable, "-m", "bench.echo_server", "--port",
                                 str(echo_port), "--model-repository", str(EXAMPLES)],
                                stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
        aio_port = free_port()
        bare = subprocess.Popen([sys.executable, "-m", "bench.http_library", "bare", "aiohttp",
                                 str(aio_port)], stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL)
        try:
            assert echo.stdout is not None
            echo.stdout.readline()  # ECHO READY
            with ServerProcess(repo) as server:
                server.wait_ready()
                request, _ = http_request()
                for name, pid, load in (
                        ("grpc shmserve", server.pid,
                         lambda n: _grpc_load(server.url, n, args.concurrency)),
                        ("grpc bare echo", echo.pid,
                         lambda n: _grpc_load(f"127.0.0.1:{echo_port}", n, args.concurrency)),
                        ("http shmserve", server.pid,
                         lambda n: _http_load(server.http_port, n, args.concurrency, request)),
                        ("http bare aiohttp", bare.pid,
                         lambda n: _http_load(aio_port, n, args.concurrency, request))):
                    if name.split()[0] not in args.doors.split(","):
                        continue
                    asyncio.run(load(warm))
                    spy = None
                    if args.profile is not None and name.endswith("shmserve"):
                        args.profile.mkdir(parents=True, exist_ok=True)
                        spy = _py_spy(pid, 10, args.profile / f"{name.split()[0]}.txt")
                        time.sleep(1.0)
                    cpu_us, rate = _measure(pid, load(total), total)
                    if spy is not None:
                        spy.wait(60)
                    rows.append((name, cpu_us, rate))
        finally:
            for process in (echo, bare):
                process.terminate()
                process.wait(10)
    reference = {name.split()[0]: cpu_us for name, cpu_us, _ in rows if "bare" in name}
    print(f"{'server':<20}{'CPU µs/request':>16}{'x bare CPU':>12}{'requests/s':>12}")
    for name, cpu_us, rate in rows:
        print(f"{name:<20}{cpu_us:>16.0f}{cpu_us / reference[name.split()[0]]:>12.2f}"
              f"{rate:>12.0f}")


if __name__ == "__main__":
    main()
