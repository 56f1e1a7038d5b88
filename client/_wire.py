"""Protobuf wire helpers for the tensor payload: no extra copies of tensor bytes.

``ModelInferRequest.raw_input_contents`` and ``ModelInferResponse.raw_output_contents`` are
repeated ``bytes`` fields. Going through the generated message costs two copies each way
(array -> bytes -> message -> wire, and wire -> message -> bytes -> array). Both fields are
length-delimited fields at the top level of their message, and protobuf allows a message's
fields in any order, so:

- a request is the serialized message *without* tensor bytes followed by one
  ``tag, length, bytes`` record per raw input, joined straight from the arrays' buffers (one
  copy, into the bytes object gRPC sends);
- a response is split at the top level: the raw output records become memoryview slices of the
  received bytes (NumPy views them, no copy) and everything else is parsed by protobuf.
"""

from __future__ import annotations

from collections.abc import Sequence

from shmserve.protos import shmserve_service_pb2 as pb

_LEN = 2  # wire type of length-delimited fields

Buffer = bytes | memoryview

RAW_INPUT_FIELD = pb.ModelInferRequest.DESCRIPTOR.fields_by_name["raw_input_contents"].number
RAW_OUTPUT_FIELD = pb.ModelInferResponse.DESCRIPTOR.fields_by_name["raw_output_contents"].number
STREAM_ERROR_FIELD = pb.ModelStreamInferResponse.DESCRIPTOR.fields_by_name["error_message"].number
STREAM_RESPONSE_FIELD = (
    pb.ModelStreamInferResponse.DESCRIPTOR.fields_by_name["infer_response"].number)


def _varint(value: int) -> bytes:
    if value < 0x80:
        return _ONE_BYTE[value]
    out = bytearray()
    while value > 0x7F:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


_ONE_BYTE = [bytes((value,)) for value in range(0x80)]
_RAW_INPUT_TAG = _varint((RAW_INPUT_FIELD << 3) | _LEN)


def encode_infer_request(header: pb.ModelInferRequest, raw: Sequence[Buffer]) -> bytes:
    """``header`` (a request without raw contents) plus the raw tensor buffers, serialized."""
    head: bytes = header.SerializeToString()
    if not raw:
        return head
    parts: list[Buffer] = [head]
    for buffer in raw:
        parts.append(_RAW_INPUT_TAG)
        parts.append(_varint(len(buffer) if isinstance(buffer, bytes) else buffer.nbytes))
        parts.append(buffer)
    return b"".join(parts)


def _read_varint(data: memoryview, pos: int) -> tuple[int, int]:
    result = 0
    shift = 0
    while True:
        byte = data[pos]
        pos += 1
        result |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return result, pos
        shift += 7


def split_fields(data: memoryview, field: int) -> tuple[list[memoryview], list[memoryview]]:
    """Top-level records of a message: (payloads of length-delimited ``field``, the rest).

    The rest is a list of whole records (tag included) that together form a valid message.
    Raises ValueError on a malformed message.
    """
    wanted: list[memoryview] = []
    rest: list[memoryview] = []
    pos = 0
    end = len(data)
    try:
        while pos < end:
            start = pos
            key, pos = _read_varint(data, pos)
            number, wire_type = key >> 3, key & 7
            if wire_type == 0:
                _, pos = _read_varint(data, pos)
            elif wire_type == 1:
                pos += 8
            elif wire_type == 5:
                pos += 4
            elif wire_type == _LEN:
                length, pos = _read_varint(data, pos)
                if number == field:
                    wanted.append(data[pos:pos + length])
                    pos += length
                    if pos > end:
                        raise ValueError("truncated field")
                    continue
                pos += length
            else:
                raise ValueError(f"unsupported wire type {wire_type}")
            if pos > end:
                raise ValueError("truncated field")
            rest.append(data[start:pos])
    except IndexError:
        raise ValueError("truncated varint") from None
    return wanted, rest


def decode_infer_response(data: bytes | memoryview) -> tuple[pb.ModelInferResponse,
                                                              list[memoryview]]:
    """The response without its tensor bytes, and each raw output as a view of ``data``."""
    view = memoryview(data)
    raw, rest = split_fields(view, RAW_OUTPUT_FIELD)
    header = pb.ModelInferResponse.FromString(b"".join(rest))
    return header, raw


def decode_stream_response(data: bytes) -> tuple[str, pb.ModelInferResponse, list[memoryview]]:
    """(error_message, infer_response without tensor bytes, raw outputs) of a stream answer."""
    view = memoryview(data)
    responses, rest = split_fields(view, STREAM_RESPONSE_FIELD)
    error = pb.ModelStreamInferResponse.FromString(b"".join(rest)).error_message
    if not responses:
        return error, pb.ModelInferResponse(), []
    header, raw = decode_infer_response(responses[-1])
    return error, header, raw
