"""AWS event-stream framing (application/vnd.amazon.eventstream), the binary format of SageMaker's
`InvokeEndpointWithResponseStream` body, written for the local runtime emulator; botocore's own
parser (`botocore.eventstream`) reads it back.

A message: total length (4 bytes), headers length (4), CRC-32 of those 8 bytes (4), headers, payload,
CRC-32 of everything before it (4); all big-endian. A header: name length (1), name, value type (1;
7 = string), value length (2), value.
"""

from __future__ import annotations

import struct
import zlib

_STRING = 7
_PRELUDE = struct.Struct(">II")
_CRC = struct.Struct(">I")


def _header(name: str, value: str) -> bytes:
    key, data = name.encode(), value.encode()
    return struct.pack(">B", len(key)) + key + struct.pack(">BH", _STRING, len(data)) + data


def message(headers: dict[str, str], payload: bytes) -> bytes:
    encoded = b"".join(_header(name, value) for name, value in headers.items())
    prelude = _PRELUDE.pack(4 + 4 + 4 + len(encoded) + len(payload) + 4, len(encoded))
    head = prelude + _CRC.pack(zlib.crc32(prelude)) + encoded + payload
    return head + _CRC.pack(zlib.crc32(head))


def payload_part(data: bytes) -> bytes:
    """One `PayloadPart` event: a piece of the container's answer, as the runtime forwards it."""
    return message({":event-type": "PayloadPart", ":content-type": "application/octet-stream",
                    ":message-type": "event"}, data)


def model_stream_error(message_text: str, error_code: str = "StreamBroken") -> bytes:
    """The `ModelStreamError` exception event (botocore raises it as ModelStreamError)."""
    import json

    return message({":exception-type": "ModelStreamError", ":content-type": "application/json",
                    ":message-type": "exception"},
                   json.dumps({"Message": message_text, "ErrorCode": error_code}).encode())
