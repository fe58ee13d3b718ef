"""The README's quick start, as a new user runs it: init, serve, an SDK call, a report
from somewhere else. Every step is the real command in a subprocess."""

from __future__ import annotations

import asyncio
import json
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import openai
import yaml

from tests.fake_upstream import FakeUpstream


def meterproxy(
    *argv: str, cwd: Path, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "proxy", *argv], cwd=cwd, capture_output=True, text=True,
        env={**os.environ, **(env or {})}, timeout=60, check=False,
    )  # fmt: skip


async def start_serve(
    cwd: Path, *argv: str, env: dict[str, str] | None = None
) -> tuple[Any, int, list[str]]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "proxy", "serve", *argv, cwd=cwd, stderr=asyncio.subprocess.PIPE,
        env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})},
    )  # fmt: skip
    assert proc.stderr is not None
    lines: list[str] = []
    while True:
        line = (await asyncio.wait_for(proc.stderr.readline(), 30)).decode()
        if not line:
            raise AssertionError("serve exited at startup:\n" + "".join(lines))
        lines.append(line)
        m = re.search(r"listening on http://127\.0\.0\.1:(\d+)", line)
        if m:
            return proc, int(m.group(1)), lines


async def stop(proc: Any, lines: list[str]) -> None:
    proc.terminate()
    rest = await asyncio.wait_for(proc.stderr.read(), 30)
    lines.extend(rest.decode().splitlines(keepends=True))
    assert await asyncio.wait_for(proc.wait(), 30) == 0


async def test_init_serve_call_report_from_elsewhere(
    tmp_path: Path, fake: tuple[FakeUpstream, str]
) -> None:
    _, upstream_url = fake
    home = tmp_path / "srv" / "mp"
    home.mkdir(parents=True)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()

    init = meterproxy("init", "--upstream", upstream_url, "--port", "0", cwd=home)
    assert init.returncode == 0, init.stderr
    assert "wrote meterproxy.yaml" in init.stdout
    written = yaml.safe_load((home / "meterproxy.yaml").read_text())
    assert written["upstreams"][0]["base_url"] == upstream_url
    assert len(written["admin"]["token"]) >= 16
    assert written["budgets"]["defaults"]["max_cost_per_day_usd"] == 20
    assert (home / "meterproxy.yaml").stat().st_mode & 0o077 == 0  # it holds the token
    again = meterproxy("init", "--upstream", upstream_url, cwd=home)
    assert again.returncode == 2 and "pass --force" in again.stderr

    check = meterproxy("check", cwd=home)  # found as ./meterproxy.yaml
    assert check.returncode == 0, check.stderr
    assert f"config {home / 'meterproxy.yaml'} (from ./meterproxy.yaml): OK" in check.stdout

    proc, port, lines = await start_serve(home)
    try:
        startup = "".join(lines)
        assert f"config {home / 'meterproxy.yaml'} (from ./meterproxy.yaml)" in startup
        assert f"ledger {home / 'meterproxy.db'} (new)" in startup
        client = openai.AsyncOpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="sk-user",
                                    max_retries=0, default_headers={"X-Agent-Id": "quick"})  # fmt: skip
        reply = await client.chat.completions.create(
            model="gpt-4o", messages=[{"role": "user", "content": "hi"}]
        )
        assert reply.usage is not None and reply.usage.prompt_tokens == 12
    finally:
        await stop(proc, lines)

    env = {"METERPROXY_CONFIG": str(home / "meterproxy.yaml")}
    report = meterproxy("report", "--format", "json", cwd=elsewhere, env=env)
    assert report.returncode == 0, report.stderr
    rows = json.loads(report.stdout)["rows"]
    assert [(r["agent"], r["llm_calls"], r["cost_usd"]) for r in rows] == [("quick", 1, "0.00008")]
    assert list(elsewhere.iterdir()) == []  # nothing created where the command ran


async def test_serve_upstream_flag_without_any_config(
    tmp_path: Path, fake: tuple[FakeUpstream, str]
) -> None:
    upstream, upstream_url = fake
    proc, port, lines = await start_serve(tmp_path, "--upstream", upstream_url, "--port", "0")
    try:
        assert "no config file (defaults; looked for --config, $METERPROXY_CONFIG," in "".join(
            lines
        )
        client = openai.AsyncOpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="sk-user",
                                    max_retries=0)  # fmt: skip
        await client.chat.completions.create(
            model="gpt-4o", messages=[{"role": "user", "content": "hi"}]
        )
        assert upstream.requests[-1].path == "/v1/chat/completions"
    finally:
        await stop(proc, lines)
    assert (tmp_path / "meterproxy.db").is_file()
