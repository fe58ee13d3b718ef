"""Token counting works with no network: nothing may be downloaded."""

from __future__ import annotations

import socket
from typing import Any

import pytest

from proxy.shapes.openai import prompt
from proxy.tokens import FALLBACK_ENCODING, TokenCounter


@pytest.fixture
def no_network(monkeypatch: pytest.MonkeyPatch, tmp_path: Any) -> None:
    def refuse(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("token counting tried to use the network")

    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(tmp_path))  # an empty cache


def test_counts_offline_with_the_bundled_encoding(no_network: None) -> None:
    counter = TokenCounter()
    counter.load()
    assert counter.encoding_for("gpt-4o").name == FALLBACK_ENCODING
    assert counter.encoding_for("claude-sonnet-4-5").name == FALLBACK_ENCODING
    # "user" + "hi" + 4 per message + 3 priming
    assert (
        counter.count_prompt("gpt-4o", prompt({"messages": [{"role": "user", "content": "hi"}]}))
        == 9
    )
    assert counter.count("gpt-4o", ["Hello world"]) == 2


def test_prompt_shapes() -> None:
    counter = TokenCounter()
    assert counter.count_prompt("m", prompt({"input": "the quick brown fox"})) == 4
    assert counter.count_prompt("m", prompt({"input": [[1, 2, 3], [4, 5]]})) == 5
    assert counter.count_prompt("m", prompt({"prompt": ["ab", "cd"]})) == 2
    responses = {"input": [{"role": "user", "content": [{"type": "input_text", "text": "hi"}]}],
                 "instructions": "Be brief"}  # fmt: skip
    # "hi" 1 + "Be brief" 2 + 4 for the item
    assert counter.count_prompt("m", prompt(responses)) == 7
    image = {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]}
    image_prompt = prompt(image)
    assert counter.count_prompt("m", image_prompt) == 1 + 4 + 3  # the image is priced apart
    assert [(m.kind, m.remote) for m in image_prompt.media] == [("image", True)]


async def test_big_prompts_are_counted_off_the_loop() -> None:
    counter = TokenCounter()
    body = {"messages": [{"role": "user", "content": "word " * 100_000}]}
    assert await counter.count_prompt_async("gpt-4o", prompt(body)) == counter.count_prompt(
        "gpt-4o", prompt(body)
    )
