"""ModelInfer on the wire without protobuf's copies of tensor bytes.

Parsing a 16 MiB ModelInferRequest with protobuf copies the tensor into the message and again
into a Python ``bytes`` on access; building the response copies each output twice more. Here
the top-level ``raw_input_contents`` fields become memoryview slices of the received buffer,
and responses are protobuf-serialized metadata with the raw outputs spliced in as
length-delimited fields (protobuf allows a message's fields in any order).
"""

from __future__ import annotations

from collections.abc import Sequence

from shmserve.protos import shmserve_service_pb2 as pb

RAW_INPUT_FIELD = 7      # ModelInferRequest.raw_input_contents
RAW_OUTPUT_FIELD = 6     # ModelInferResponse.raw_output_contents
STREAM_RESPONSE_FIELD = 2  # ModelStreamInferResponse.infer_response
_LENGTH_DELIMITED = 2


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


def parse_infer_request(data: bytes) -> tuple[pb.ModelInferRequest, list[memoryview]]:
    """The request without its raw contents, and the raw contents as zero-copy slices."""
    view = memoryview(data)
    raw: list[memoryview] = []
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
