from __future__ import annotations

import json

from proxy.shapes.openai import ChatReader, ResponsesReader
from proxy.sse import MAX_EVENT_BYTES, StreamMeter


def event(obj: object) -> bytes:
    return b"data: " + json.dumps(obj, separators=(",", ":")).encode() + b"\n\n"


CHUNK = {"id": "c", "model": "gpt-4o-x", "choices": [{"delta": {"content": "hi "}}], "usage": None}
USAGE = {"id": "c", "choices": [], "usage": {"prompt_tokens": 7, "completion_tokens": 2}}
DONE = b"data: [DONE]\n\n"


def test_unchanged_chunks_pass_as_the_same_object() -> None:
    meter = StreamMeter(ChatReader(False))
    chunk = event(CHUNK)
    assert meter.feed(chunk) is chunk


def test_usage_chunk_stripped_and_null_usage_removed_when_injected() -> None:
    meter = StreamMeter(ChatReader(True))
    out = meter.feed(event(CHUNK) + event(USAGE))
    assert out == event({k: v for k, v in CHUNK.items() if k != "usage"})
    assert meter.facts.usage is not None and meter.facts.usage.input_tokens == 7
    assert meter.feed(DONE) == b""  # held until the ledger row is committed
    assert meter.finish() == DONE


def test_kept_when_the_client_asked() -> None:
    meter = StreamMeter(ChatReader(False))
    assert meter.feed(event(USAGE)) == event(USAGE)
    assert meter.facts.usage is not None


def test_events_split_across_reads_and_crlf() -> None:
    meter = StreamMeter(ChatReader(False))
    whole = event(CHUNK).replace(b"\n\n", b"\r\n\r\n") + DONE
    out = b"".join(meter.feed(whole[i : i + 7]) for i in range(0, len(whole), 7))
    assert out == event(CHUNK).replace(b"\n\n", b"\r\n\r\n")
    assert meter.finish() == DONE
    assert meter.model == "gpt-4o-x"


def test_responses_completed_is_the_final_event() -> None:
    meter = StreamMeter(ResponsesReader())
    delta = b'event: response.output_text.delta\ndata: {"type":"response.output_text.delta","delta":"x"}\n\n'
    done = (
        b"event: response.completed\ndata: "
        + json.dumps({"type": "response.completed", "response": {
            "object": "response", "model": "gpt-5", "usage": {"input_tokens": 3, "output_tokens": 1}}
        }).encode()
        + b"\n\n"
    )  # fmt: skip
    assert meter.feed(delta + done) == delta
    assert meter.finish() == done
    assert meter.facts.usage is not None and meter.facts.usage.output_tokens == 1
    assert meter.facts.model == "gpt-5"


def test_a_whole_stream_in_one_read_is_counted_as_when_it_trickles() -> None:
    pieces = [{**CHUNK, "choices": [{"delta": {"content": w}}]} for w in ("a ", "b ", "c")]
    whole = b"".join(event(p) for p in pieces) + event(USAGE) + DONE
    for step in (len(whole), 1, 10):  # one read (a fast upstream), then trickles
        meter = StreamMeter(ChatReader(True), count_output=True)
        out = b"".join(meter.feed(whole[i : i + step]) for i in range(0, len(whole), step))
        sent = b"".join(event({k: v for k, v in p.items() if k != "usage"}) for p in pieces)
        assert out == sent  # the usage chunk the proxy asked for is dropped
        assert "".join(meter.take_fresh()) == "a b c"  # what the stream budget counts
        assert meter.facts.usage is not None and meter.facts.usage.output_tokens == 2
        assert meter.finish() == DONE
        assert meter.model == "gpt-4o-x"


def test_generated_text_is_kept_for_estimates() -> None:
    meter = StreamMeter(ChatReader(False))
    for _ in range(3):
        meter.feed(event(CHUNK))
    assert meter.generated_texts() == ["hi ", "hi ", "hi "]


def test_a_huge_unterminated_event_is_passed_through_not_buffered() -> None:
    meter = StreamMeter(ChatReader(True))
    blob = b"data: " + b"x" * (MAX_EVENT_BYTES + 10)
    out = meter.feed(blob)
    # All but its last bytes go on at once (those wait: they may carry the usage).
    assert meter.passthrough and out == blob[: len(out)] and len(blob) - len(out) == 256 * 1024
    more = meter.feed(b"y" * 300_000)
    assert len(more) == 300_000 and meter.passthrough
    assert meter.feed(b"\n\n") == b"".join([blob, b"y" * 300_000, b"\n\n"])[len(out) + 300_000 :]
    assert not meter.passthrough


def test_invalid_usage_is_reported_not_priced() -> None:
    meter = StreamMeter(ChatReader(False))
    meter.feed(event({"choices": [], "usage": {"prompt_tokens": "many", "completion_tokens": 1}}))
    assert meter.facts.usage is None
    assert meter.facts.usage_error is not None and "'many'" in meter.facts.usage_error


def _token_chunk(i: int) -> bytes:
    word = f" w{i % 97}"
    return event(
        {"object": "chat.completion.chunk", "model": "gpt-4o",
         "choices": [{"index": 0, "delta": {"content": word}, "finish_reason": None}]}
    )  # fmt: skip


def test_a_long_stream_holds_one_string_of_its_text_not_its_events() -> None:
    """Thousands of open streams: each keeps what an estimate needs (its text), joined,
    and at most 8 KB of raw events; the text is whole, in order, whatever the mode."""
    chunks = [_token_chunk(i) for i in range(3000)]
    expected = "".join(f" w{i % 97}" for i in range(3000))
    for count_output in (False, True):
        meter = StreamMeter(ChatReader(strip_usage=False), count_output=count_output)
        fresh: list[str] = []
        for chunk in chunks:
            assert meter.feed(chunk) == chunk
            fresh += meter.take_fresh()
            assert meter._data_bytes <= 8 * 1024
            assert len(meter.texts) <= 65
        assert sum(len(c) for c in chunks) > 200_000  # far past what may be kept raw
        assert "".join(meter.generated_texts()) == expected
        assert fresh == ([f" w{i % 97}" for i in range(3000)] if count_output else [])


def test_chunks_read_without_parsing_count_the_same_text_as_parsed_ones() -> None:
    contents = ["plain ", 'quoted "x" ', "line\n", "é🙂 ", "\\ ", "tab\t"]
    chunks = [{**CHUNK, "choices": [{"index": 0, "delta": {"content": c}}]} for c in contents]
    two = {"id": "c", "choices": [{"index": 0, "delta": {"content": "A"}},
                                  {"index": 1, "delta": {"content": "B"}}]}  # fmt: skip
    first = {"id": "c", "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}}]}
    stream = [event(first)] + [event(c) for c in chunks] + [event(two), event(USAGE), DONE]
    for whole_reads in (False, True):
        meter = StreamMeter(ChatReader(True), count_output=True)
        reads = [b"".join(stream)] if whole_reads else stream
        out = b"".join(meter.feed(r) for r in reads) + meter.finish()
        # Everything passes, but the usage chunk the proxy asked for (and its nulls).
        assert out == b"".join([*stream[:-2], DONE]).replace(b',"usage":null', b"")
        assert "".join(meter.take_fresh()) == "".join(contents) + "AB"
        assert "".join(meter.generated_texts()) == "".join(contents) + "AB"
