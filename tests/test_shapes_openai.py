from __future__ import annotations

from typing import Any

import pytest

from proxy.shapes.openai import facts_from_body, output_texts, parse_usage
from proxy.usage import InvalidUsage, Usage


def test_chat_usage_with_details() -> None:
    u = parse_usage(
        {
            "prompt_tokens": 100,
            "completion_tokens": 50,
            "prompt_tokens_details": {"cached_tokens": 40},
            "completion_tokens_details": {"reasoning_tokens": 30},
        }
    )
    assert u == Usage(100, 40, 50, 30, 0, None, "provider")


def test_responses_usage() -> None:
    u = parse_usage(
        {
            "input_tokens": 10,
            "input_tokens_details": {"cached_tokens": 2},
            "output_tokens": 7,
            "output_tokens_details": {"reasoning_tokens": 3},
        }
    )
    assert (u.input_tokens, u.cached_input_tokens, u.output_tokens, u.reasoning_tokens) == (
        10, 2, 7, 3,
    )  # fmt: skip


def test_embeddings_usage_has_no_output() -> None:
    assert parse_usage({"prompt_tokens": 8, "total_tokens": 8}).output_tokens == 0


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        ({"prompt_tokens": -5, "completion_tokens": 1}, "prompt_tokens=-5 is negative"),
        ({"prompt_tokens": "12", "completion_tokens": 1}, "prompt_tokens='12' is not a whole"),
        ({"prompt_tokens": 1.5, "completion_tokens": 1}, "is not a whole number"),
        ({"prompt_tokens": True, "completion_tokens": 1}, "is not a whole number"),
        ({"total_tokens": 3}, "neither prompt_tokens nor input_tokens"),
        ("12", "usage is str"),
        (
            {"prompt_tokens": 5, "completion_tokens": 1, "prompt_tokens_details": {"cached_tokens": 9}},
            "exceed input tokens (5)",
        ),
        (
            {"prompt_tokens": 5, "completion_tokens": 1,
             "completion_tokens_details": {"reasoning_tokens": 2}},
            "reasoning tokens (2) exceed output tokens (1)",
        ),
    ],
)  # fmt: skip
def test_nonsense_usage_is_rejected(raw: Any, message: str) -> None:
    with pytest.raises(InvalidUsage, match=None) as e:
        parse_usage(raw)
    assert message in str(e.value)


def test_facts_from_a_response_object_and_its_completed_event() -> None:
    body = {"object": "response", "model": "gpt-5-2025", "service_tier": "flex",
            "usage": {"input_tokens": 3, "output_tokens": 4}}  # fmt: skip
    facts = facts_from_body(body)
    assert facts.model == "gpt-5-2025"
    assert facts.usage is not None and facts.usage.service_tier == "flex"
    event = facts_from_body({"type": "response.completed", "response": body})
    assert event.usage == facts.usage


def test_invalid_usage_becomes_an_error_not_a_number() -> None:
    facts = facts_from_body({"model": "m", "usage": {"prompt_tokens": -1}})
    assert facts.usage is None
    assert facts.usage_error == "invalid provider usage: prompt_tokens=-1 is negative"


def test_output_texts_of_every_shape() -> None:
    chat = {"choices": [{"message": {"content": "a", "tool_calls": [
        {"function": {"name": "f", "arguments": "{}"}}]}}]}  # fmt: skip
    assert list(output_texts(chat)) == ["a", "f", "{}"]
    assert list(output_texts({"choices": [{"delta": {"content": "b"}}]})) == ["b"]
    assert list(output_texts({"choices": [{"text": "c"}]})) == ["c"]
    assert list(output_texts({"type": "response.output_text.delta", "delta": "d"})) == ["d"]
    resp = {"object": "response", "output": [{"content": [{"type": "output_text", "text": "e"}]}]}
    assert list(output_texts(resp)) == ["e"]


# A stream chunk's text read without parsing it must be exactly what parsing reads, or
# nothing (then the chunk is parsed): every shape a provider or a bug may send.
_CHUNK = '{"id":"c","object":"chat.completion.chunk","choices":[{"index":0,"delta":%s,"finish_reason":null}]}'


@pytest.mark.parametrize(
    ("payload", "read"),
    [
        (_CHUNK % '{"content":" the"}', " the"),
        (_CHUNK % '{"content":""}', ""),
        (_CHUNK % '{"content":"é 日本 🙂"}', "é 日本 🙂"),
        (_CHUNK % '{"content":"a}b]c,d:{"}', "a}b]c,d:{"),
        # Escapes: orjson decodes them.
        (_CHUNK % '{"content":"say \\"hi\\"\\n"}', None),
        (_CHUNK % '{"content":"\\u00e9"}', None),
        (_CHUNK % '{"content":"\\\\"}', None),
        # A delta that is more than its content.
        (_CHUNK % '{"role":"assistant","content":""}', None),
        (_CHUNK % '{"content":"x","refusal":null}', None),
        (_CHUNK % '{"content":null}', None),
        (_CHUNK % '{"content": "spaced"}', None),
        (_CHUNK % '{"tool_calls":[{"index":0,"function":{"arguments":"{\\"a\\":1}"}}]}', None),
        (_CHUNK % '{"reasoning_content":"think"}', None),
        ('{"choices":[]}', None),
        ('{"choices":[{"index":0,"text":"legacy"}]}', None),
        # Two choices (n=2): the general path reads both.
        (
            '{"choices":[{"index":0,"delta":{"content":"a"}},{"index":1,"delta":{"content":"b"}}]}',
            None,
        ),
        (
            '{"choices":[{"index":0,"delta":{"role":"assistant"}},'
            '{"index":1,"delta":{"content":"b"}}]}',
            None,
        ),
        # Not valid UTF-8 (a provider's bug): parsed, and orjson refuses it.
        (b'{"choices":[{"index":0,"delta":{"content":"\xff"}}]}', None),
        # Unterminated: parsed (and found to be no JSON).
        ('{"choices":[{"index":0,"delta":{"content":"cut', None),
        ("[DONE]", None),
    ],
)
def test_plain_text_reads_a_chunk_as_parsing_it_would(
    payload: str | bytes, read: str | None
) -> None:
    import orjson

    from proxy.shapes.openai import ChatReader

    raw = payload.encode() if isinstance(payload, str) else payload
    reader = ChatReader(strip_usage=False)
    assert reader.plain_text(raw) == read
    if read is not None:
        assert list(reader.texts(orjson.loads(raw))) == [read]
