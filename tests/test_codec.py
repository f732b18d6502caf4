"""The wire format: decoding bodies into the handler's type, encoding values into bodies."""

from __future__ import annotations

import json
import uuid
from typing import Any

import pytest
from pydantic import BaseModel

from listener.codec import CONTENT_TYPE, DecodeFailure, MessageCodec, encode, new_message_id
from listener.errors import InvalidMessage

LIMIT = 1024
SECRET = "s3cr3t-value"


class CopyRequest(BaseModel):
    case_id: int
    src: str
    dst: str


def codec(annotation: Any = CopyRequest, limit: int = LIMIT) -> MessageCodec:
    return MessageCodec(annotation, max_body_bytes=limit)


VALID = b'{"case_id": 1, "src": "a", "dst": "b"}'


def decode_failure(body: bytes, content_type: str | None = CONTENT_TYPE, **kwargs: Any):
    with pytest.raises(DecodeFailure) as caught:
        codec(**kwargs).decode(body, content_type, None)
    return caught.value


# -- failures ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "content_type",
    [
        "text/plain",
        "application/x-python-pickle",
        "application/python-pickle",
        "application/octet-stream",
        "application/xml",
    ],
)
def test_a_body_of_another_content_type_is_never_decoded(content_type):
    failure = decode_failure(VALID, content_type)
    assert failure.reason == "unsupported_content_type"
    assert content_type in failure.detail


@pytest.mark.parametrize("encoding", ["gzip", "deflate", "base64"])
def test_a_body_with_a_content_encoding_is_never_decoded(encoding):
    with pytest.raises(DecodeFailure) as caught:
        codec().decode(VALID, CONTENT_TYPE, encoding)
    assert caught.value.reason == "unsupported_content_type"
    assert encoding in caught.value.detail


@pytest.mark.parametrize("body", [b"{not json", b"\xff\xfe", b'{"case_id": 1,', b""])
@pytest.mark.parametrize("annotation", [CopyRequest, None, dict[str, int]])
def test_a_body_that_is_not_json_is_a_decode_error(body, annotation):
    failure = decode_failure(body, annotation=annotation)
    assert failure.reason == "decode_error"
    assert str(failure).startswith("decode_error: ")


def test_a_body_that_does_not_fit_the_model_is_a_validation_error_without_its_values():
    body = json.dumps({"case_id": SECRET, "src": "a"}).encode()
    failure = decode_failure(body)
    assert failure.reason == "validation_error"
    assert "case_id" in failure.detail
    assert "dst" in failure.detail
    assert SECRET not in failure.detail
    assert SECRET not in str(failure)
    assert SECRET not in repr(failure)


def test_a_body_of_the_wrong_json_shape_is_a_validation_error():
    failure = decode_failure(b"[1, 2, 3]")
    assert failure.reason == "validation_error"


def test_a_body_over_the_size_limit_is_too_large():
    body = json.dumps({"case_id": 1, "src": "a" * LIMIT, "dst": "b"}).encode()
    failure = decode_failure(body)
    assert failure.reason == "too_large"
    assert str(LIMIT) in failure.detail


def test_a_too_large_body_is_refused_before_its_content_type_is_looked_at():
    failure = decode_failure(b"x" * (LIMIT + 1), "application/x-python-pickle")
    assert failure.reason == "too_large"


def test_a_body_exactly_at_the_size_limit_is_decoded():
    body = b'{"case_id": 1, "src": "", "dst": "' + b"b" * 100 + b'"}'
    padded = body + b" " * (LIMIT - len(body))
    assert len(padded) == LIMIT
    assert codec().decode(padded, CONTENT_TYPE, None).dst == "b" * 100


# -- successes -----------------------------------------------------------------------------


def test_a_valid_body_becomes_a_model_instance():
    value = codec().decode(VALID, CONTENT_TYPE, None)
    assert value == CopyRequest(case_id=1, src="a", dst="b")


@pytest.mark.parametrize("content_type", [None, ""])
def test_a_body_without_a_content_type_is_read_as_json(content_type):
    value = codec().decode(VALID, content_type, None)
    assert value == CopyRequest(case_id=1, src="a", dst="b")


@pytest.mark.parametrize(
    "content_type",
    ["application/json; charset=utf-8", "Application/JSON", " application/json ", "text/json"],
)
def test_json_content_types_with_parameters_or_other_case_are_accepted(content_type):
    assert codec().decode(VALID, content_type, None).case_id == 1


@pytest.mark.parametrize("encoding", [None, "", "utf-8", "UTF-8", "identity"])
def test_plain_content_encodings_are_accepted(encoding):
    assert codec().decode(VALID, CONTENT_TYPE, encoding).src == "a"


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        (b'{"a": [1, 2]}', {"a": [1, 2]}),
        (b"[1, 2]", [1, 2]),
        (b'"text"', "text"),
        (b"3", 3),
        (b"null", None),
    ],
)
def test_without_an_annotation_the_handler_gets_the_plain_json_value(body, expected):
    assert codec(None).decode(body, None, None) == expected


def test_a_generic_annotation_is_validated_too():
    assert codec(dict[str, int]).decode(b'{"a": 1}', None, None) == {"a": 1}
    assert decode_failure(b'{"a": "x"}', annotation=dict[str, int]).reason == "validation_error"


# -- encode --------------------------------------------------------------------------------


def test_encoding_fields_that_do_not_fit_the_model_raises_invalid_message_without_values():
    fields = {"case_id": SECRET, "src": "a"}
    with pytest.raises(InvalidMessage) as caught:
        codec().encode(fields)
    text = str(caught.value)
    assert "case_id" in text
    assert "dst" in text
    assert SECRET not in text
    assert caught.value.__cause__ is None
    assert caught.value.__suppress_context__


def test_a_model_instance_round_trips():
    c = codec()
    message = CopyRequest(case_id=7, src="a", dst="b")
    body = c.encode(message)
    assert json.loads(body) == {"case_id": 7, "src": "a", "dst": "b"}
    assert c.decode(body, CONTENT_TYPE, None) == message


def test_fields_as_a_dict_are_validated_and_round_trip():
    c = codec()
    body = c.encode({"case_id": "7", "src": "a", "dst": "b"})
    assert json.loads(body) == {"case_id": 7, "src": "a", "dst": "b"}
    assert c.decode(body, CONTENT_TYPE, None) == CopyRequest(case_id=7, src="a", dst="b")


def test_a_plain_value_round_trips_without_an_annotation():
    c = codec(None)
    value = {"a": [1, 2.5, None, "x"], "b": {"c": True}}
    assert c.decode(c.encode(value), None, None) == value


def test_encoding_an_unserialisable_value_without_an_annotation_is_a_type_error():
    with pytest.raises(TypeError, match="cannot encode"):
        codec(None).encode({"x": object()})


def test_encoding_an_unserialisable_value_under_a_loose_annotation_is_a_type_error():
    # dict[Any, Any] accepts any value, so the failure only shows when serialising.
    with pytest.raises(TypeError):
        codec(dict).encode({"x": object()})


def test_the_module_level_encode_serialises_models_and_plain_values():
    assert json.loads(encode(CopyRequest(case_id=1, src="a", dst="b")))["case_id"] == 1
    assert json.loads(encode([1, "a"])) == [1, "a"]
    with pytest.raises(TypeError):
        encode(object())


def test_message_ids_are_unique_hex():
    ids = {new_message_id() for _ in range(100)}
    assert len(ids) == 100
    assert all(len(i) == 32 and int(i, 16) >= 0 for i in ids)


def test_message_ids_are_random_uuids_as_uuid4_writes_them(monkeypatch):
    for _ in range(1000):
        parsed = uuid.UUID(hex=new_message_id())
        assert (parsed.version, parsed.variant) == (4, uuid.RFC_4122)
    fixed = bytes(range(240, 256))
    monkeypatch.setattr("os.urandom", lambda n: fixed[:n])
    assert new_message_id() == uuid.UUID(bytes=fixed, version=4).hex
