"""The response cache end to end: a real server with --cache-config, tritonclient.grpc, system
shared memory. The model numbers its executions (RUN): an answer from the cache repeats the
RUN of the execution it was kept from, a new execution shows a new one."""

from __future__ import annotations

import itertools
import os
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.utils.shared_memory as shm

from shmserve.client import Client
from shmserve.daemon.model_config import ConfigError, complete_config
from shmserve.daemon.response_cache import CachedOutput, CacheEntry, ResponseCache
from shmserve.daemon.settings import parse_cache_config
from shmserve.protos import shmserve_model_config_pb2 as mc
from shmserve.tests.serverproc import ServerProcess, build_repository

MODEL = "cache_counter"
CACHE_BYTES = 8_000_000
BIG = 3_000_000          # an entry of this much: two fit, a third evicts the oldest
PREFIX = f"/rcshm{os.getpid()}_"
_keys = itertools.count(1)


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    repo = build_repository(tmp_path_factory.mktemp("cache") / "models", [MODEL])
    proc = ServerProcess(repo, "--cache-config", f"local,size={CACHE_BYTES}",
                         "--local-socket", str(repo.parent / "shmserve.sock"))
    try:
        proc.wait_ready()
        yield proc
    finally:
        proc.stop()


@pytest.fixture()
def client(server: ServerProcess) -> Iterator[grpcclient.InferenceServerClient]:
    with grpcclient.InferenceServerClient(server.url) as c:
        yield c


def _inputs(seed: int, size: int) -> list[grpcclient.InferInput]:
    inputs = []
    for name, value in (("SEED", seed), ("SIZE", size)):
        tensor = grpcclient.InferInput(name, [1], "INT32")
        tensor.set_data_from_numpy(np.array([value], dtype=np.int32))
        inputs.append(tensor)
    return inputs


def _infer(client: grpcclient.InferenceServerClient, seed: int, size: int,
           outputs: list[grpcclient.InferRequestedOutput] | None = None) -> Any:
    return client.infer(MODEL, _inputs(seed, size), outputs=outputs)


def _expected(seed: int, size: int) -> np.ndarray:
    return (np.arange(size, dtype=np.int64) + seed).astype(np.uint8)


def _stats(client: grpcclient.InferenceServerClient) -> Any:
    return client.get_inference_statistics(MODEL).model_stats[0]


def test_hit_and_miss_are_counted_and_answers_are_identical(
        server: ServerProcess, client: grpcclient.InferenceServerClient) -> None:
    before = _stats(client)
    first = _infer(client, 11, 64)
    again = _infer(client, 11, 64)
    other = _infer(client, 12, 64)
    assert np.array_equal(first.as_numpy("OUT"), _expected(11, 64))
    assert np.array_equal(again.as_numpy("OUT"), first.as_numpy("OUT"))
    assert again.as_numpy("RUN")[0] == first.as_numpy("RUN")[0]  # not executed again
    assert other.as_numpy("RUN")[0] != first.as_numpy("RUN")[0]
    assert np.array_equal(other.as_numpy("OUT"), _expected(12, 64))
    after = _stats(client)
    stats, old = after.inference_stats, before.inference_stats
    assert stats.cache_hit.count == old.cache_hit.count + 1
    assert stats.cache_miss.count == old.cache_miss.count + 2
    assert stats.success.count == old.success.count + 3
    assert after.execution_count == before.execution_count + 2  # the hit ran nothing
    assert after.inference_count == before.inference_count + 2
    assert server.metric("nv_cache_num_hits_per_model", MODEL) == stats.cache_hit.count
    assert server.metric("nv_cache_num_misses_per_model", MODEL) == stats.cache_miss.count


def test_a_request_asking_other_outputs_is_another_key(
        client: grpcclient.InferenceServerClient) -> None:
    both = _infer(client, 21, 8)
    only_run = _infer(client, 21, 8, [grpcclient.InferRequestedOutput("RUN")])
    assert only_run.as_numpy("OUT") is None
    assert only_run.as_numpy("RUN")[0] != both.as_numpy("RUN")[0]


class _Region:
    """A client system shared-memory region registered with the server."""

    def __init__(self, client: grpcclient.InferenceServerClient, size: int) -> None:
        self.client = client
        self.name = f"rc{os.getpid()}_{next(_keys)}"
        self.key = f"{PREFIX}{self.name}"
        self.handle = shm.create_shared_memory_region(self.name, self.key, size)
        self.size = size
        client.register_system_shared_memory(self.name, self.key, size)

    def output(self, name: str) -> grpcclient.InferRequestedOutput:
        requested = grpcclient.InferRequestedOutput(name)
        requested.set_shared_memory(self.name, self.size)
        return requested

    def read(self, nbytes: int) -> np.ndarray:
        data: np.ndarray = shm.get_contents_as_numpy(self.handle, np.uint8, [nbytes])
        return data.copy()

    def close(self) -> None:
        self.client.unregister_system_shared_memory(self.name)
        shm.destroy_shared_memory_region(self.handle)


@pytest.mark.parametrize("size", [4096, 1_500_000])  # on the event loop, and off it
def test_outputs_into_shared_memory_miss_then_hits(
        server: ServerProcess, client: grpcclient.InferenceServerClient, size: int) -> None:
    """A miss written into a region is kept (read back from the region); a hit for a request
    whose output goes to another region is a copy into that region; one without a region
    gets the bytes."""
    seed = 31 if size == 4096 else 32
    first, second = _Region(client, size), _Region(client, size)
    try:
        before = _stats(client).inference_stats.cache_hit.count
        miss = _infer(client, seed, size, [first.output("OUT"),
                                            grpcclient.InferRequestedOutput("RUN")])
        assert np.array_equal(first.read(size), _expected(seed, size))
        hit = _infer(client, seed, size, [second.output("OUT"),
                                          grpcclient.InferRequestedOutput("RUN")])
        assert hit.get_output("OUT").parameters["shared_memory_region"].string_param == \
            second.name
        assert np.array_equal(second.read(size), _expected(seed, size))
        assert hit.as_numpy("RUN")[0] == miss.as_numpy("RUN")[0]
        assert _stats(client).inference_stats.cache_hit.count == before + 1
        maps = Path(f"/proc/{server.pid}/maps")
        assert second.key.lstrip("/") in maps.read_text()  # mapped once, kept for the next
    finally:
        first.close()
        second.close()
    assert PREFIX.lstrip("/") not in maps.read_text()  # unmapped once unregistered


def _minor_faults(pid: int) -> int:
    stat = Path(f"/proc/{pid}/stat").read_text()
    return int(stat[stat.rindex(")") + 2:].split()[7])


def test_hits_into_a_region_fault_no_pages_in_the_supervisor(
        server: ServerProcess, client: grpcclient.InferenceServerClient) -> None:
    """Hits copied by a thread (past LOOP_BYTES) into one region: the supervisor maps it
    once and keeps it, so a hit faults in none of its pages (a mapping per hit would fault
    all 489 each time); each hit still writes the bytes."""
    size, seed = 2_000_000, 33
    source, target = _Region(client, size), _Region(client, size)
    try:
        _infer(client, seed, size, [source.output("OUT")])       # the miss
        _infer(client, seed, size, [target.output("OUT")])       # maps the target
        before = _minor_faults(server.pid)
        for _ in range(3):
            shm.set_shared_memory_region(target.handle, [np.zeros(size, dtype=np.uint8)])
            _infer(client, seed, size, [target.output("OUT")])
            assert np.array_equal(target.read(size), _expected(seed, size))
        faulted = _minor_faults(server.pid) - before
        assert faulted < 300, f"the supervisor faulted {faulted} pages in 3 hits"
    finally:
        source.close()
        target.close()


def test_a_hit_into_a_too_small_region_fails_as_an_execution_would(
        client: grpcclient.InferenceServerClient) -> None:
    _infer(client, 41, 256, [grpcclient.InferRequestedOutput("OUT"),
                             grpcclient.InferRequestedOutput("RUN")])
    small = _Region(client, 128)
    executed = _stats(client).execution_count
    try:
        with pytest.raises(Exception, match="should be at least 256 bytes"):
            _infer(client, 41, 256, [small.output("OUT"), grpcclient.InferRequestedOutput("RUN")])
        assert _stats(client).execution_count == executed  # refused by the cache's hit
    finally:
        small.close()


def test_least_recently_used_entry_is_evicted_at_the_size_limit(
        server: ServerProcess, client: grpcclient.InferenceServerClient) -> None:
    runs = {seed: _infer(client, seed, BIG).as_numpy("RUN")[0] for seed in (51, 52)}
    assert _infer(client, 51, BIG).as_numpy("RUN")[0] == runs[51]   # 51 used after 52
    _infer(client, 53, BIG)                                           # evicts 52
    assert _infer(client, 51, BIG).as_numpy("RUN")[0] == runs[51]
    assert _infer(client, 52, BIG).as_numpy("RUN")[0] != runs[52]
    held = re.search(r"^shmserve_response_cache_bytes (\S+)$", server.metrics_page(), re.M)
    assert held is not None and 2 * BIG <= float(held.group(1)) <= CACHE_BYTES


def test_local_channel_hits_as_bytes_and_into_its_own_regions(
        server: ServerProcess, client: grpcclient.InferenceServerClient) -> None:
    """The local channel's worker-answered path is off for a cached model (the cache needs
    the outputs); hits come back as bytes, or copied into the channel's memfd region."""
    size = 1_200_000
    feed = {"SEED": np.array([61], dtype=np.int32), "SIZE": np.array([size], dtype=np.int32)}
    before = _stats(client).inference_stats.cache_hit.count
    with Client(f"local://{server.repository.parent / 'shmserve.sock'}") as local:
        first = local.infer(MODEL, feed)
        again = local.infer(MODEL, feed)
        assert again["RUN"][0] == first["RUN"][0]
        assert np.array_equal(again["OUT"], _expected(61, size))
        with local.shared_memory(size) as region:
            target = region.ndarray(size, np.uint8)
            target[:] = 0
            into = local.infer(MODEL, feed, outputs={"OUT": target, "RUN": None})
            assert into["RUN"][0] == first["RUN"][0]
            assert np.array_equal(target, _expected(61, size))
    assert _stats(client).inference_stats.cache_hit.count == before + 2


# --- pure ----------------------------------------------------------------------------------
def _entry(nbytes: int) -> CacheEntry:
    return CacheEntry((CachedOutput("OUT", "UINT8", (nbytes,), bytes(nbytes)),))


def test_cache_keeps_recently_used_within_its_capacity() -> None:
    cache = ResponseCache(3 * _entry(1000).nbytes)
    for key in (b"a", b"b", b"c"):
        assert cache.insert(key, _entry(1000))
    assert cache.lookup(b"a") is not None
    assert cache.insert(b"d", _entry(1000))
    assert cache.lookup(b"b") is None and cache.evictions == 1
    assert [cache.lookup(k) is not None for k in (b"a", b"c", b"d")] == [True] * 3
    assert cache.used <= cache.capacity
    assert not cache.insert(b"huge", _entry(10_000))  # larger than the cache: not kept
    assert len(cache) == 3


def test_cache_config_flag_is_tritons() -> None:
    assert parse_cache_config("local,size=1048576") == ("local", "size", "1048576")
    for bad in ("redis,host=x", "local,size=0", "local,bytes=5", "local"):
        with pytest.raises(Exception):  # noqa: B017 - argparse's ArgumentTypeError
            parse_cache_config(bad)


def test_a_decoupled_model_cannot_enable_the_cache(tmp_path: Path) -> None:
    config = mc.ModelConfig(name="m", backend="python")
    config.output.add(name="O", data_type=mc.TYPE_INT32, dims=[1])
    config.model_transaction_policy.decoupled = True
    config.response_cache.enable = True
    (tmp_path / "m").mkdir()
    with pytest.raises(ConfigError, match="Response Cache does not currently support model m "
                                          "with 'decoupled' transaction policy"):
        complete_config(config, tmp_path / "m", [])
