"""ModelInfer on the wire without protobuf's copies of tensor bytes.

Parsing a 16 MiB ModelInferRequest with protobuf copies the tensor into the message and again
into a Python ``bytes`` on access; building the response copies each output twice more. Here
the top-level ``raw_input_contents`` fields become memoryview slices of the received buffer,
and responses are protobuf-serialized metadata with the raw outputs spliced in as
length-delimited fields (protobuf allows a message's fields in any order). A large response
is one ``bytes`` object that the outputs are read into straight from the worker's output
arena: one copy per output in this process (gRPC copies the message into its own buffer).
"""

from __future__ import annotations

import ctypes
import sys
from collections.abc import Sequence

from google.protobuf.message import DecodeError

from shmserve.daemon.request import OutputTensor
from shmserve.protos import shmserve_service_pb2 as pb

RAW_INPUT_FIELD = 7      # ModelInferRequest.raw_input_contents
RAW_OUTPUT_FIELD = 6     # ModelInferResponse.raw_output_contents
STREAM_RESPONSE_FIELD = 2  # ModelStreamInferResponse.infer_response
_LENGTH_DELIMITED = 2
# Below this a request is parsed by protobuf whole (see parse_infer_request).
SMALL_REQUEST_BYTES = 16 << 10
# Below this a response is joined from its parts (a copy more, but cheaper than the setup).
FILL_IN_PLACE_BYTES = 64 << 10


_ONE_BYTE = [bytes((value,)) for value in range(0x80)]


class WireError(ValueError):
    pass


def _varint(data: memoryview, position: int) -> tuple[int, int]:
    result = 0
    shift = 0
    while True:
        if position >= len(data) or shift > 63:
            raise WireError("truncated or oversized varint")
        byte = data[position]
        position += 1
        result |= (byte & 0x7F) << shift
        if byte < 0x80:
            return result, position
        shift += 7


def encode_varint(value: int) -> bytes:
    if value < 0x80:
        return _ONE_BYTE[value]
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        if value:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def _skip(data: memoryview, position: int, wire_type: int) -> int:
    if wire_type == 0:
        return _varint(data, position)[1]
    if wire_type == 1:
        return position + 8
    if wire_type == 2:
        length, position = _varint(data, position)
        return position + length
    if wire_type == 5:
        return position + 4
    raise WireError(f"unsupported wire type {wire_type}")


def parse_infer_request(data: bytes
                        ) -> tuple[pb.ModelInferRequest, list[bytes | memoryview]]:
    """The request without its raw contents, and the raw contents as zero-copy slices.
    A small request is parsed by protobuf whole (copying its few bytes of tensor data costs
    less than walking the fields here)."""
    if len(data) < SMALL_REQUEST_BYTES:
        try:
            message = pb.ModelInferRequest.FromString(data)
        except DecodeError as exc:
            raise WireError(str(exc) or "not a ModelInferRequest") from None
        small = list(message.raw_input_contents)
        message.ClearField("raw_input_contents")
        return message, small
    view = memoryview(data)
    raw: list[bytes | memoryview] = []
    rest: list[memoryview] = []
    position = 0
    total = len(view)
    while position < total:
        start = position
        key, position = _varint(view, position)
        field, wire_type = key >> 3, key & 7
        if field == RAW_INPUT_FIELD and wire_type == _LENGTH_DELIMITED:
            length, position = _varint(view, position)
            if position + length > total:
                raise WireError("raw_input_contents runs past the end of the message")
            raw.append(view[position:position + length])
            position += length
            continue
        position = _skip(view, position, wire_type)
        if position > total:
            raise WireError("field runs past the end of the message")
        rest.append(view[start:position])
    message = pb.ModelInferRequest()
    message.ParseFromString(b"".join(rest) if len(rest) != 1 else rest[0].tobytes())
    return message, raw


def serialize_infer_response(response: pb.ModelInferResponse,
                             raw: Sequence[bytes | memoryview]) -> bytes:
    tag = encode_varint(RAW_OUTPUT_FIELD << 3 | _LENGTH_DELIMITED)
    parts: list[bytes | memoryview] = [response.SerializeToString()]
    for item in raw:
        parts.append(tag)
        parts.append(encode_varint(len(item)))
        parts.append(item)
    return b"".join(parts)


def serialize_stream_response(infer_response: bytes) -> bytes:
    tag = encode_varint(STREAM_RESPONSE_FIELD << 3 | _LENGTH_DELIMITED)
    return b"".join((tag, encode_varint(len(infer_response)), infer_response))


def serialize_infer_outputs(response: pb.ModelInferResponse | bytes,
                            outputs: Sequence[OutputTensor], stream: bool = False) -> bytes:
    """``serialize_infer_response`` of ``outputs`` (region outputs: no bytes), wrapped as a
    ModelStreamInferResponse if ``stream``; a large one is built in place, each output
    copied once into it (pending ones straight from the output arena). ``response``: the
    metadata, or it serialized already."""
    output_tag = encode_varint(RAW_OUTPUT_FIELD << 3 | _LENGTH_DELIMITED)
    head = response if isinstance(response, bytes) else response.SerializeToString()
    prefixes = [output_tag + encode_varint(output.nbytes) for output in outputs]
    body = len(head) + sum(len(prefix) + output.nbytes
                           for prefix, output in zip(prefixes, outputs, strict=True))
    outer = b""
    if stream:
        outer = encode_varint(STREAM_RESPONSE_FIELD << 3 | _LENGTH_DELIMITED) + encode_varint(body)
    total = len(outer) + body
    if total < FILL_IN_PLACE_BYTES:
        parts: list[bytes] = [outer, head]
        for prefix, output in zip(prefixes, outputs, strict=True):
            parts += (prefix, output.data or b"")
        return b"".join(parts)
    message, view = _unfilled_bytes(total)
    position = 0
    for piece in (outer, head):
        view[position:position + len(piece)] = piece
        position += len(piece)
    for prefix, output in zip(prefixes, outputs, strict=True):
        view[position:position + len(prefix)] = prefix
        position += len(prefix)
        size = output.nbytes
        output.copy_into(view[position:position + size])
        position += size
    view.release()
    return message


# A new bytes object's contents, written before anyone else sees the object: what C code does
# with PyBytes_FromStringAndSize(NULL, n). gRPC sends only ``bytes``; filling one in place
# spares the copy a bytearray (or a join) would cost. ob_sval follows the fixed header.
_BYTES_HEADER = sys.getsizeof(b"") - 1
_new_bytes = ctypes.pythonapi.PyBytes_FromStringAndSize
_new_bytes.restype = ctypes.py_object
_new_bytes.argtypes = (ctypes.c_void_p, ctypes.c_ssize_t)


def _unfilled_bytes(size: int) -> tuple[bytes, memoryview]:
    """A new ``bytes`` of ``size`` (> 1: never a shared singleton) and a writable view of
    its contents, valid while the bytes object lives."""
    assert size > 1
    message: bytes = _new_bytes(None, size)
    buffer = (ctypes.c_char * size).from_address(id(message) + _BYTES_HEADER)
    return message, memoryview(buffer).cast("B")
