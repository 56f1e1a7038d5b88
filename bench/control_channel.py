"""Control channel candidates: Unix socketpair vs POSIX message queues (posix_ipc).

Round trips of a msgpack frame the size of a `simple` EXEC frame between an asyncio (uvloop)
supervisor and a blocking worker process, as the daemon uses them. Run:
    python bench/control_channel.py [--count N]
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing
import os
import socket
import statistics
import threading
import time

import msgpack
import posix_ipc
import uvloop

FRAME = msgpack.packb({"t": "exec", "b": 1, "reqs": [{
    "rid": "", "in": [["INPUT0", "INT32", [1, 16], "i", bytes(64), 0, 64],
                      ["INPUT1", "INT32", [1, 16], "i", bytes(64), 0, 64]],
    "out": [], "p": {}, "cid": 0}]})


def socket_worker(sock: socket.socket) -> None:
    unpacker = msgpack.Unpacker()
    while True:
        chunk = sock.recv(1 << 16)
        if not chunk:
            return
        unpacker.feed(chunk)
        for _ in unpacker:
            sock.sendall(FRAME)


def queue_worker(to_worker: str, to_supervisor: str) -> None:
    inbox = posix_ipc.MessageQueue(to_worker)
    outbox = posix_ipc.MessageQueue(to_supervisor)
    while True:
        message, _ = inbox.receive()
        if not message:
            return
        outbox.send(FRAME)


async def measure_socketpair(count: int) -> list[float]:
    parent, child = socket.socketpair()
    process = multiprocessing.get_context("fork").Process(target=socket_worker, args=(child,))
    process.start()
    child.close()
    loop = asyncio.get_running_loop()
    waiter: asyncio.Future[None] | None = None
    unpacker = msgpack.Unpacker()

    class Channel(asyncio.Protocol):
        def data_received(self, data: bytes) -> None:
            unpacker.feed(data)
            for _ in unpacker:
                if waiter is not None and not waiter.done():
                    waiter.set_result(None)

    parent.setblocking(False)
    transport, _ = await loop.create_unix_connection(Channel, sock=parent)
    times = []
    for _ in range(count):
        waiter = loop.create_future()
        started = time.perf_counter()
        transport.write(FRAME)
        await waiter
        times.append(time.perf_counter() - started)
    transport.close()
    process.join(5)
    return times


async def measure_queues(count: int) -> list[float]:
    names = (f"/bench_ctl_in_{os.getpid()}", f"/bench_ctl_out_{os.getpid()}")
    inbox = posix_ipc.MessageQueue(names[0], posix_ipc.O_CREX, max_message_size=8192)
    outbox = posix_ipc.MessageQueue(names[1], posix_ipc.O_CREX, max_message_size=8192)
    process = multiprocessing.get_context("fork").Process(target=queue_worker, args=names)
    process.start()
    loop = asyncio.get_running_loop()
    replies: asyncio.Queue[bytes] = asyncio.Queue()

    def reader() -> None:  # a queue cannot join the event loop: one thread blocks on it
        while True:
            message, _ = outbox.receive()
            if message == b"stop":
                return
            loop.call_soon_threadsafe(replies.put_nowait, message)

    thread = threading.Thread(target=reader, daemon=True)
    thread.start()
    times = []
    try:
        for _ in range(count):
            started = time.perf_counter()
            inbox.send(FRAME)
            await replies.get()
            times.append(time.perf_counter() - started)
    finally:
        inbox.send(b"")
        outbox.send(b"stop")
        process.join(5)
        thread.join(5)
        for queue in (inbox, outbox):
            queue.close()
            queue.unlink()
    return times


def report(label: str, times: list[float]) -> None:
    times.sort()
    p50 = statistics.median(times) * 1e6
    p99 = times[int(len(times) * 0.99)] * 1e6
    print(f"| {label} | {p50:.1f} | {p99:.1f} | {len(times) / sum(times):,.0f} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--count", type=int, default=20000)
    args = parser.parse_args()
    print("| channel | p50 µs | p99 µs | round trips/s |\n| --- | --- | --- | --- |")
    report("socketpair + asyncio protocol", uvloop.run(measure_socketpair(args.count)))
    report("posix_ipc message queues + reader thread", uvloop.run(measure_queues(args.count)))


if __name__ == "__main__":
    main()
