"""Client CUDA IPC regions inside a worker: open handles lazily, wrap them as torch tensors.

The supervisor stores a region's 64-byte ``cudaIpcMemHandle_t`` and device id and never opens
it; the worker that first needs the region opens it here, with cuda-python's
``cudaIpcOpenMemHandle(handle, cudaIpcMemLazyEnablePeerAccess)``, and caches the mapping per
registration id until the supervisor RELEASEs that id (unregister, after the last request).

Copies of tensor bytes (see docs/gpu.md):

* input in a region on the instance's GPU: **0** -- the backend gets a torch CUDA tensor whose
  memory is the client's allocation (``__cuda_array_interface__``, no copy);
* input in a region on another GPU: **1** peer/device-to-device copy into the instance's GPU
  (the handle is opened in the instance's context with lazy peer access, then copied);
* input for a CPU instance, BYTES inputs, or a worker without torch: **1** device-to-host copy;
* output into a region: **1** copy (device-to-device from a CUDA tensor, host-to-device from a
  NumPy array), finished before the response leaves the worker;
* a CUDA tensor output going to a system region, the output arena or inline into the response:
  **1** device-to-host copy straight into that memory (:class:`DeviceOutput`).

Nothing here imports torch or cuda-python at import time: both are optional extras
(``shmserve[torch]``, ``shmserve[cuda]``), imported on first use in a worker only. The
supervisor never imports this module's dependencies.

A mapping stays open while anything still uses it: every tensor made over a region holds a
reference to the mapping (torch keeps the ``__cuda_array_interface__`` object alive as long as
the tensor and its views live). ``release`` drops the cache's reference; the handle is closed
(``cudaIpcCloseMemHandle``) when the last tensor goes, or at once when there is none.
"""

from __future__ import annotations

import contextlib
import ctypes
import importlib
import logging
import os
import weakref
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np

from shmserve.protos.datatypes import (
    ELEMENT_SIZE,
    bf16_dtype,
    deserialize_bytes_tensor,
    element_count,
    from_numpy_dtype,
    serialize_bytes_tensor,
    to_numpy_dtype,
)
from shmserve.workers.backend import BackendError
from shmserve.workers.protocol import TensorRef

log = logging.getLogger("shmserve.worker.cuda")

CUDA_IPC_HANDLE_SIZE = 64
CUDA_EXTRA_HINT = "install the optional extra: pip install 'shmserve[cuda]'"

# V2 datatype <-> torch dtype attribute name (resolved on use: torch is optional).
_TORCH_DTYPES: dict[str, str] = {
    "BOOL": "bool", "UINT8": "uint8", "UINT16": "uint16", "UINT32": "uint32",
    "UINT64": "uint64", "INT8": "int8", "INT16": "int16", "INT32": "int32", "INT64": "int64",
    "FP16": "float16", "FP32": "float32", "FP64": "float64", "BF16": "bfloat16",
}
_V2_FROM_TORCH: dict[str, str] = {torch_name: v2 for v2, torch_name in _TORCH_DTYPES.items()}


class CudaError(Exception):
    """A CUDA call failed; the message names the call and CUDA's error name and text."""


# ---------------------------------------------------------------------------------------------
# Device numbering


def local_ordinal(host_gpu: int, visible: str | None = None) -> int | None:
    """The CUDA ordinal this process uses for host GPU ``host_gpu``; None when it is hidden.

    A ``KIND_GPU`` worker runs with ``CUDA_VISIBLE_DEVICES=<its GPU>``, so its GPU is ordinal
    0. Without ``CUDA_VISIBLE_DEVICES`` ordinals are host ids. Entries that are UUIDs or MIG ids
    cannot be matched to a host id; a single such entry is taken to be the device.
    """
    if visible is None:
        visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is None:
        return host_gpu
    entries = [entry.strip() for entry in visible.split(",") if entry.strip()]
    # CUDA stops at the first invalid entry ("-1", a typo): later entries are not visible.
    valid: list[str] = []
    for entry in entries:
        if entry.lstrip("-").isdigit() and int(entry) < 0:
            break
        valid.append(entry)
    if str(host_gpu) in valid:
        return valid.index(str(host_gpu))
    if len(valid) == 1 and not valid[0].isdigit():
        return 0
    return None


# ---------------------------------------------------------------------------------------------
# The CUDA calls (cuda-python), behind a small interface so tests can stand in for a GPU


class CudaRuntime(Protocol):
    """The handful of CUDA operations a worker needs for IPC regions."""

    def open_handle(self, raw_handle: bytes, device: int) -> int:
        """``cudaIpcOpenMemHandle`` in ``device``'s context; the allocation's base pointer."""
        ...

    def close_handle(self, pointer: int, device: int) -> None:
        """``cudaIpcCloseMemHandle`` of a pointer ``open_handle`` returned."""
        ...

    def allocation_size(self, pointer: int, device: int) -> int | None:
        """Size of the allocation at ``pointer`` (``cuMemGetAddressRange``); None if unknown."""
        ...

    def copy(self, dst: int, src: int, nbytes: int, device: int, stream: int = 0) -> None:
        """``cudaMemcpyAsync(..., cudaMemcpyDefault, stream)`` then wait for ``stream``."""
        ...


def _import_cuda_python() -> tuple[Any, Any]:
    """(runtime, driver) modules of cuda-python, newest layout first."""
    for runtime_name, driver_name in (("cuda.bindings.runtime", "cuda.bindings.driver"),
                                      ("cuda.cudart", "cuda.cuda")):       # cuda-python < 12.6
        try:
            return importlib.import_module(runtime_name), importlib.import_module(driver_name)
        except ImportError:
            continue
    raise BackendError(f"CUDA shared memory needs cuda-python in the worker; "
                       f"{CUDA_EXTRA_HINT}", "UNAVAILABLE")


class CudaPythonRuntime:
    """:class:`CudaRuntime` through cuda-python's runtime bindings (driver for address ranges)."""

    def __init__(self) -> None:
        self._rt, self._drv = _import_cuda_python()

    def _error_text(self, error: Any) -> str:
        try:
            _, name = self._rt.cudaGetErrorName(error)
            _, text = self._rt.cudaGetErrorString(error)
            return f"{name.decode()}: {text.decode()}"
        except Exception:
            return str(error)

    def _check(self, result: Any, call: str) -> Any:
        error = result[0]
        if error != self._rt.cudaError_t.cudaSuccess:
            raise CudaError(f"{call} failed: {self._error_text(error)}")
        return result[1] if len(result) == 2 else result[1:]

    @contextlib.contextmanager
    def _on_device(self, device: int) -> Iterator[None]:
        """Make ``device`` current for the block and put the previous device back after."""
        previous = self._rt.cudaGetDevice()
        switch = previous[0] != self._rt.cudaError_t.cudaSuccess or previous[1] != device
        if switch:
            self._check(self._rt.cudaSetDevice(device), f"cudaSetDevice({device})")
        try:
            yield
        finally:
            if switch and previous[0] == self._rt.cudaError_t.cudaSuccess:
                self._rt.cudaSetDevice(previous[1])

    def open_handle(self, raw_handle: bytes, device: int) -> int:
        if len(raw_handle) != CUDA_IPC_HANDLE_SIZE:
            raise CudaError(f"a CUDA IPC handle has {CUDA_IPC_HANDLE_SIZE} bytes, got "
                            f"{len(raw_handle)}")
        handle = self._rt.cudaIpcMemHandle_t()
        # cuda-bindings >= 13 has no settable 'reserved' field: write through the struct pointer.
        ctypes.memmove(handle.getPtr(), bytes(raw_handle), CUDA_IPC_HANDLE_SIZE)
        with self._on_device(device):
            pointer = self._check(
                self._rt.cudaIpcOpenMemHandle(handle, self._rt.cudaIpcMemLazyEnablePeerAccess),
                "cudaIpcOpenMemHandle")
        return int(pointer)

    def close_handle(self, pointer: int, device: int) -> None:
        with self._on_device(device):
            self._check(self._rt.cudaIpcCloseMemHandle(pointer), "cudaIpcCloseMemHandle")

    def allocation_size(self, pointer: int, device: int) -> int | None:
        try:
            with self._on_device(device):
                error, _base, size = self._drv.cuMemGetAddressRange(self._drv.CUdeviceptr(pointer))
        except Exception as exc:       # driver library missing, old bindings: size unknown
            log.debug("cuMemGetAddressRange failed: %s", exc)
            return None
        if error != self._drv.CUresult.CUDA_SUCCESS:
            log.debug("cuMemGetAddressRange failed: %s", error)
            return None
        return int(size)

    def copy(self, dst: int, src: int, nbytes: int, device: int, stream: int = 0) -> None:
        if nbytes == 0:
            return
        with self._on_device(device):
            self._check(self._rt.cudaMemcpyAsync(dst, src, nbytes,
                                                 self._rt.cudaMemcpyKind.cudaMemcpyDefault,
                                                 stream), "cudaMemcpyAsync")
            self._check(self._rt.cudaStreamSynchronize(stream), "cudaStreamSynchronize")


# ---------------------------------------------------------------------------------------------
# torch interop (torch is imported on first use)


def import_torch() -> Any:
    try:
        import torch
    except ImportError:
        raise BackendError("this needs PyTorch in the worker; install the optional extra: "
                           "pip install 'shmserve[torch]'", "UNAVAILABLE") from None
    return torch


def torch_available() -> bool:
    try:
        import_torch()
    except BackendError:
        return False
    return True


def torch_dtype(datatype: str) -> Any:
    torch = import_torch()
    name = _TORCH_DTYPES.get(datatype)
    dtype = getattr(torch, name, None) if name else None
    if dtype is None:
        raise BackendError(f"datatype {datatype} has no torch dtype in this PyTorch",
                           "INVALID_ARGUMENT")
    return dtype


def datatype_of_torch(dtype: Any) -> str:
    """The KServe v2 datatype of a torch dtype (torch.float32 -> "FP32")."""
    name = str(dtype).removeprefix("torch.")
    try:
        return _V2_FROM_TORCH[name]
    except KeyError:
        raise ValueError(f"torch dtype {name} has no KServe v2 datatype") from None


def is_torch_tensor(value: Any) -> bool:
    return type(value).__module__.split(".")[0] == "torch" and hasattr(value, "data_ptr")


def host_array(value: Any) -> np.ndarray:
    """A NumPy array of a torch tensor: one device-to-host copy for CUDA tensors, none on CPU.

    BF16 becomes ``ml_dtypes.bfloat16`` (raw uint16 without ml_dtypes), which NumPy lacks.
    """
    if not is_torch_tensor(value):
        return np.asarray(value)
    torch = import_torch()
    tensor = value.detach()
    if tensor.is_conj():
        tensor = tensor.resolve_conj()
    if tensor.is_neg():
        tensor = tensor.resolve_neg()
    if tensor.dtype == torch.bfloat16:
        return np.asarray(_to_host(tensor.view(torch.int16)).numpy()).view(bf16_dtype())
    return np.asarray(_to_host(tensor).numpy())


# Device-to-host copies from this size up land in page-locked memory from torch's caching host
# allocator: on an H200 host a 64 MiB copy took 24 ms into fresh pageable memory and 1.2 ms into
# reused pinned memory. Smaller copies are not worth holding pinned memory for.
PINNED_STAGING_MIN_BYTES = 1 << 20


def _to_host(tensor: Any) -> Any:
    """``tensor`` on the host; CUDA tensors of PINNED_STAGING_MIN_BYTES or more via pinned
    memory."""
    if not tensor.is_cuda or tensor.numel() * tensor.element_size() < PINNED_STAGING_MIN_BYTES:
        return tensor.cpu()
    torch = import_torch()
    host = torch.empty(tensor.shape, dtype=tensor.dtype, pin_memory=True)
    host.copy_(tensor)      # not non_blocking: the bytes are on the host on return
    return host


def output_meta(value: Any) -> tuple[str, list[int], int]:
    """(datatype, shape, nbytes) of an output without moving it off its device."""
    if is_torch_tensor(value):
        return (datatype_of_torch(value.dtype), [int(d) for d in value.shape],
                int(value.numel()) * int(value.element_size()))
    array = np.asarray(value)
    datatype = from_numpy_dtype(array.dtype)
    if datatype == "BYTES":
        return datatype, [int(d) for d in array.shape], len(serialize_bytes_tensor(array))
    return datatype, [int(d) for d in array.shape], int(array.nbytes)


class DeviceOutput:
    """An output still in GPU memory: it has a size (``len``) and is copied only when written.

    ``write_to`` is the one device-to-host copy straight into shared memory (a client's system
    region or the output arena); :meth:`CudaRegions.write` copies it device-to-device.
    """

    __slots__ = ("nbytes", "tensor")

    def __init__(self, tensor: Any) -> None:
        tensor = tensor.detach()
        if tensor.is_conj() or tensor.is_neg():
            tensor = tensor.resolve_conj().resolve_neg()
        self.tensor = tensor.contiguous()
        self.nbytes = int(self.tensor.numel()) * int(self.tensor.element_size())

    def __len__(self) -> int:
        return self.nbytes

    def write_to(self, buffer: memoryview) -> None:
        """One device-to-host copy into ``buffer`` (at least ``nbytes`` long, writable)."""
        if self.nbytes == 0:
            return
        torch = import_torch()
        target = torch.frombuffer(buffer, dtype=torch.uint8, count=self.nbytes)
        target.copy_(self.tensor.reshape(-1).view(torch.uint8))
        del target

    def __bytes__(self) -> bytes:
        out = bytearray(self.nbytes)
        self.write_to(memoryview(out))
        return bytes(out)


def device_output(value: Any) -> DeviceOutput | None:
    """A :class:`DeviceOutput` for a torch CUDA tensor; None for anything in host memory."""
    if is_torch_tensor(value) and bool(getattr(value, "is_cuda", False)):
        return DeviceOutput(value)
    return None


class _CudaArrayView:
    """``__cuda_array_interface__`` over bytes of a mapping; keeps the mapping open."""

    __slots__ = ("_interface", "mapping")

    def __init__(self, mapping: IpcMapping, pointer: int, nbytes: int) -> None:
        self.mapping = mapping
        self._interface = {"shape": (nbytes,), "typestr": "|u1", "data": (pointer, False),
                           "strides": None, "version": 3}

    @property
    def __cuda_array_interface__(self) -> dict[str, Any]:
        return self._interface


# ---------------------------------------------------------------------------------------------
# Mappings and the per-worker cache


def _close_quietly(runtime: CudaRuntime, pointer: int, device: int, region_id: int) -> None:
    try:
        runtime.close_handle(pointer, device)
    except Exception as exc:       # a finalizer must not raise
        log.warning("closing CUDA IPC region %d failed: %s", region_id, exc)


class IpcMapping:
    """One opened handle: the allocation's base ``pointer`` in ``device``'s context."""

    def __init__(self, runtime: CudaRuntime, region_id: int, host_gpu: int, device: int,
                 pointer: int, size: int | None) -> None:
        self.region_id = region_id
        self.host_gpu = host_gpu      # where the allocation lives, as the client numbered it
        self.device = device          # the CUDA ordinal whose context opened the handle
        self.pointer = pointer
        self.size = size              # the allocation's size when the driver told us
        self._finalizer = weakref.finalize(self, _close_quietly, runtime, pointer, device,
                                           region_id)

    @property
    def closed(self) -> bool:
        return not self._finalizer.alive

    def close(self) -> None:
        """Close now, whatever still refers to the memory (worker shutdown only)."""
        self._finalizer()

    def check_bounds(self, offset: int, nbytes: int, what: str) -> None:
        if offset < 0 or nbytes < 0 or (self.size is not None and offset + nbytes > self.size):
            raise BackendError(
                f"{what} lies outside its CUDA shared memory region (offset {offset} + "
                f"{nbytes} bytes, allocation of {self.size} bytes)", "INVALID_ARGUMENT")


@dataclass(slots=True)
class _Placement:
    """Where this worker computes: ``home`` is the instance's ordinal (None: a CPU instance)."""

    instance_gpu: int | None
    home: int | None


class CudaRegions:
    """The worker's CUDA IPC mappings, one per registration id, opened on first use.

    ``instance_gpu`` is the host GPU id of a ``KIND_GPU`` instance (None for CPU instances).
    Constructing this imports nothing; the first CUDA reference loads cuda-python (and torch
    for tensors).
    """

    def __init__(self, instance_gpu: int | None,
                 runtime_factory: Any = None) -> None:
        self._instance_gpu = instance_gpu
        self._runtime_factory = runtime_factory
        self._runtime: CudaRuntime | None = None
        self._mappings: dict[int, IpcMapping] = {}
        self._placement: _Placement | None = None
        self._has_torch_cuda: bool | None = None

    # --- setup ------------------------------------------------------------------------------
    @property
    def runtime(self) -> CudaRuntime:
        if self._runtime is None:
            self._runtime = (self._runtime_factory or CudaPythonRuntime)()
        return self._runtime

    def placement(self) -> _Placement:
        if self._placement is None:
            home = None
            if self._instance_gpu is not None:
                home = local_ordinal(self._instance_gpu)
                if home is None:
                    raise BackendError(
                        f"GPU {self._instance_gpu} of this instance is not visible to the "
                        f"worker (CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES')})")
            self._placement = _Placement(self._instance_gpu, home)
        return self._placement

    # --- mappings ---------------------------------------------------------------------------
    def mapping(self, location: Any, what: str) -> IpcMapping:
        """The open mapping of a CUDA location ``[region_id, raw_handle, device_id]``."""
        region_id, raw_handle, host_gpu = location
        found = self._mappings.get(region_id)
        if found is not None:
            return found
        raw = bytes(raw_handle)
        if len(raw) != CUDA_IPC_HANDLE_SIZE:
            raise BackendError(f"invalid CUDA IPC handle for {what}: {len(raw)} bytes, "
                               f"expected {CUDA_IPC_HANDLE_SIZE}", "INVALID_ARGUMENT")
        placement = self.placement()
        region_ordinal = local_ordinal(int(host_gpu))
        # Open in the instance's own context (lazy peer access reaches a region on another GPU,
        # even one this process cannot see). A CPU instance opens in the region's GPU context.
        candidates = [placement.home] if placement.home is not None else []
        if region_ordinal is not None and region_ordinal not in candidates:
            candidates.append(region_ordinal)
        if not candidates:
            raise BackendError(f"CUDA shared memory for {what} is on GPU {host_gpu}, which is "
                               f"not visible to this worker", "INVALID_ARGUMENT")
        runtime = self.runtime
        errors: list[str] = []
        for device in candidates:
            try:
                pointer = runtime.open_handle(raw, device)
            except CudaError as exc:
                errors.append(f"{exc} (device {device})")
                continue
            size = runtime.allocation_size(pointer, device)
            opened = IpcMapping(runtime, int(region_id), int(host_gpu), device, pointer, size)
            self._mappings[int(region_id)] = opened
            log.debug("opened CUDA IPC region %s of GPU %s in device %d context: %#x, %s bytes",
                      region_id, host_gpu, device, pointer, size)
            return opened
        raise BackendError(f"failed to open the CUDA shared memory handle for {what} (GPU "
                           f"{host_gpu}): {'; '.join(errors)}", "INVALID_ARGUMENT")

    def release(self, region_id: int) -> None:
        """The region was unregistered and no request uses it: drop the cached mapping.

        The handle closes now, or when the last tensor over it is gone.
        """
        self._mappings.pop(int(region_id), None)

    def close_all(self) -> None:
        mappings, self._mappings = self._mappings, {}
        for mapping in mappings.values():
            mapping.close()

    def __len__(self) -> int:
        return len(self._mappings)

    # --- inputs -----------------------------------------------------------------------------
    def input(self, ref: TensorRef) -> Any:
        """The backend's value for an input in a CUDA region.

        A torch CUDA tensor when torch with CUDA is importable (zero-copy on the instance's GPU),
        else a NumPy host copy; BYTES inputs are always parsed on the host.
        """
        try:
            if ref.datatype == "BYTES" or not self._torch_cuda():
                return self.host_input(ref)
            return self.tensor(ref)
        except BackendError:
            raise
        except Exception as exc:        # a CUDA/torch failure fails the request, not the worker
            raise BackendError(f"CUDA shared memory input '{ref.name}': "
                               f"{type(exc).__name__}: {exc}") from exc

    def _torch_cuda(self) -> bool:
        """Whether torch with CUDA is importable here (checked once)."""
        if self._has_torch_cuda is None:
            self._has_torch_cuda = False
            if torch_available():
                with contextlib.suppress(Exception):
                    self._has_torch_cuda = bool(import_torch().cuda.is_available())
        return self._has_torch_cuda

    def tensor(self, ref: TensorRef) -> Any:
        what = f"input '{ref.name}'"
        torch = import_torch()
        dtype = torch_dtype(ref.datatype)
        expected = ELEMENT_SIZE[ref.datatype] * element_count(ref.shape)
        if ref.nbytes != expected:
            raise BackendError(f"input byte size mismatch for {what}: expected {expected}, got "
                               f"{ref.nbytes}", "INVALID_ARGUMENT")
        mapping = self.mapping(ref.location, what)
        mapping.check_bounds(ref.offset, ref.nbytes, what)
        placement = self.placement()
        if placement.home is not None and mapping.host_gpu != placement.instance_gpu:
            # Another GPU's memory: one peer copy into the instance's GPU.
            target = torch.empty(ref.nbytes, dtype=torch.uint8,
                                 device=torch.device("cuda", placement.home))
            stream = int(torch.cuda.current_stream(target.device).cuda_stream)
            try:
                self.runtime.copy(int(target.data_ptr()), mapping.pointer + ref.offset,
                                  ref.nbytes, placement.home, stream)
            except CudaError as exc:
                raise BackendError(f"copying {what} from GPU {mapping.host_gpu}: {exc}") from exc
            raw = target
        elif ref.nbytes == 0:
            raw = torch.empty(0, dtype=torch.uint8, device=torch.device("cuda", mapping.device))
        else:
            view = _CudaArrayView(mapping, mapping.pointer + ref.offset, ref.nbytes)
            raw = torch.as_tensor(view, device=torch.device("cuda", mapping.device))
            if (mapping.pointer + ref.offset) % max(ELEMENT_SIZE[ref.datatype], 1):
                raw = raw.clone()      # an unaligned offset: one device copy to aligned memory
        return raw.view(dtype).view(ref.shape)

    def host_input(self, ref: TensorRef) -> np.ndarray:
        """One device-to-host copy of an input (BYTES are parsed after the copy)."""
        what = f"input '{ref.name}'"
        mapping = self.mapping(ref.location, what)
        mapping.check_bounds(ref.offset, ref.nbytes, what)
        host = np.empty(ref.nbytes, dtype=np.uint8)
        try:
            self.runtime.copy(host.ctypes.data, mapping.pointer + ref.offset, ref.nbytes,
                              mapping.device)
        except CudaError as exc:
            raise BackendError(f"reading {what} from CUDA shared memory: {exc}") from exc
        if ref.datatype == "BYTES":
            try:
                flat = deserialize_bytes_tensor(host, element_count(ref.shape))
            except ValueError as exc:
                raise BackendError(f"failed to parse BYTES input '{ref.name}': {exc}",
                                   "INVALID_ARGUMENT") from exc
            parsed: np.ndarray = flat.reshape(ref.shape)
            return parsed
        fixed: np.ndarray = host.view(to_numpy_dtype(ref.datatype)).reshape(ref.shape)
        return fixed

    # --- outputs ----------------------------------------------------------------------------
    def write(self, target: TensorRef, value: Any, name: str) -> int:
        """Copy an output into the region ``target`` names; returns the bytes written.

        ``value``: a torch tensor, a :class:`DeviceOutput`, a NumPy array or raw bytes (what
        ``output_bytes`` made). A CUDA tensor is copied device-to-device (peer when on another
        GPU), on the stream that produced it; host data is copied host-to-device. The copy has
        finished on return. ``target.nbytes`` is the capacity the request gave.
        """
        try:
            return self._write(target, value, name)
        except BackendError:
            raise
        except Exception as exc:
            raise BackendError(f"writing output '{name}' to CUDA shared memory: "
                               f"{type(exc).__name__}: {exc}") from exc

    def _write(self, target: TensorRef, value: Any, name: str) -> int:
        what = f"output '{name}'"
        mapping = self.mapping(target.location, what)
        keep: Any = None
        stream = 0
        device = mapping.device
        if isinstance(value, DeviceOutput):
            value = value.tensor
        elif isinstance(value, (bytes, bytearray, memoryview)):
            value = np.frombuffer(value, dtype=np.uint8)
        if is_torch_tensor(value):
            torch = import_torch()
            keep = value.detach()
            if keep.is_conj() or keep.is_neg():
                keep = keep.resolve_conj().resolve_neg()
            keep = keep.contiguous()
            source = int(keep.data_ptr())
            nbytes = int(keep.numel()) * int(keep.element_size())
            if keep.is_cuda:
                device = int(keep.device.index or 0)
                stream = int(torch.cuda.current_stream(keep.device).cuda_stream)
        else:
            array = np.asarray(value)
            if from_numpy_dtype(array.dtype) == "BYTES":
                array = np.frombuffer(serialize_bytes_tensor(array), dtype=np.uint8)
            keep = np.ascontiguousarray(array)
            source = int(keep.ctypes.data)
            nbytes = int(keep.nbytes)
        if nbytes > target.nbytes:
            raise BackendError(f"shared memory size specified with the request for output "
                               f"'{name}' ({target.nbytes} bytes) should be at least {nbytes} "
                               f"bytes to hold the results", "INTERNAL")
        mapping.check_bounds(target.offset, nbytes, what)
        try:
            self.runtime.copy(mapping.pointer + target.offset, source, nbytes, device, stream)
        except CudaError as exc:
            raise BackendError(f"writing {what} to CUDA shared memory: {exc}") from exc
        del keep
        return nbytes


def probe_region(raw_handle: bytes, device: int, byte_size: int,
                 runtime: CudaRuntime | None = None) -> str | None:
    """Open, size-check and close a handle: None when usable, else why not (Triton's checks).

    For a registration-time check in a throwaway process that may touch CUDA (never the
    supervisor): ``device`` is the CUDA ordinal in that process.
    """
    try:
        runtime = runtime or CudaPythonRuntime()
        pointer = runtime.open_handle(bytes(raw_handle), device)
    except (CudaError, BackendError) as exc:
        return str(exc)
    try:
        size = runtime.allocation_size(pointer, device)
        if size is not None and byte_size > size:
            return f"byte_size {byte_size} exceeds the allocation's {size} bytes"
        return None
    finally:
        _close_quietly(runtime, pointer, device, -1)


__all__ = [
    "CUDA_IPC_HANDLE_SIZE",
    "CudaError",
    "CudaPythonRuntime",
    "CudaRegions",
    "CudaRuntime",
    "DeviceOutput",
    "IpcMapping",
    "datatype_of_torch",
    "device_output",
    "host_array",
    "import_torch",
    "local_ordinal",
    "output_meta",
    "probe_region",
    "torch_dtype",
]
