"""The operator's first hour and second day (issue 13), at the interfaces they touch: the
CLI as a subprocess, the HTTP API, the log a person tails."""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import shutil
import sqlite3
from pathlib import Path
from typing import Any

import aiohttp
import openai
import pytest
import yaml

from proxy.app import Options
from proxy.config import AlertsConfig, Config, Timeouts
from proxy.config_file import load_config
from proxy.pricing import bundled_pricing_path
from proxy.reload import RULES
from tests.conftest import ProxyFactory
from tests.fake_upstream import FakeUpstream
from tests.test_alerts import Receiver, receiver_url
from tests.test_quickstart import meterproxy, start_serve, stop
from tests.test_reload import wait_for

HI = [{"role": "user", "content": "hi"}]
TOKEN = "operator-admin-token-0123"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


def write(path: Path, data: Any) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(data if isinstance(data, str) else yaml.safe_dump(data))
    return path


def seed_ledger(db: Path, agent: str = "seeded", cost_pico: int = 1_234_000_000) -> None:
    """A ledger with one call row, written by the real storage migration."""
    import asyncio as aio

    from proxy.records import CallRecord
    from proxy.storage import open_storage

    async def go() -> None:
        storage = await open_storage(f"sqlite:///{db}")
        try:
            record = CallRecord("seed-1", 1.7e9, 1.7e9 + 1, agent=agent, status=200,
                                cost_pico=cost_pico, llm_calls=1, model_requested="gpt-4o")  # fmt: skip
            await storage.write_calls([record])
            await storage.sync_rollups()
        finally:
            await storage.close()

    aio.run(go())


# -- 1. the ledger is where the config says, wherever the command runs --------------------


def test_relative_ledger_resolves_against_the_config_file(tmp_path: Path) -> None:
    config = write(tmp_path / "srv" / "mp.yaml", {"storage": {"url": "sqlite:///data/mp.db"}})
    (tmp_path / "srv" / "data").mkdir()
    seed_ledger(tmp_path / "srv" / "data" / "mp.db")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    out = meterproxy("report", "--config", str(config), "--since", "2020-01-01", cwd=elsewhere)
    assert out.returncode == 0, out.stderr
    assert "seeded" in out.stdout and "0.00123" in out.stdout
    assert list(elsewhere.iterdir()) == []


def test_report_refuses_to_create_a_ledger(tmp_path: Path) -> None:
    config = write(tmp_path / "srv" / "mp.yaml", {"storage": {"url": "sqlite:///mp.db"}})
    out = meterproxy("report", "--config", str(config), cwd=tmp_path)
    ledger = tmp_path / "srv" / "mp.db"
    assert out.returncode == 2 and out.stdout == ""
    assert out.stderr.startswith(f"meterproxy: no ledger at {ledger} (config {config};")
    assert not ledger.exists() and not (tmp_path / "meterproxy.db").exists()


# -- 2. discovery -------------------------------------------------------------------------------


def test_config_discovery_order_and_the_pricing_file_beside_it(tmp_path: Path) -> None:
    here = tmp_path / "here"
    write(here / "meterproxy.yaml", {"server": {"port": 1111}})
    by_env = write(tmp_path / "env" / "meterproxy.yaml", {"server": {"port": 2222}})
    given = write(tmp_path / "given.yaml", {"server": {"port": 3333}})
    env = {"METERPROXY_CONFIG": str(by_env)}

    def found(*argv: str, environ: dict[str, str] | None = None) -> str:
        out = meterproxy("check", *argv, cwd=here, env=environ or {"METERPROXY_CONFIG": ""})
        assert out.returncode == 0, out.stderr
        return out.stdout

    assert f"config {here / 'meterproxy.yaml'} (from ./meterproxy.yaml)" in found()
    assert f"config {by_env} (from $METERPROXY_CONFIG)" in found(environ=env)
    assert f"config {given} (from --config)" in found("--config", str(given), environ=env)
    # A pricing.yaml beside the config file is the one in force.
    shutil.copy(bundled_pricing_path(), tmp_path / "env" / "pricing.yaml")
    assert f"pricing {tmp_path / 'env' / 'pricing.yaml'}: OK" in found(environ=env)
    # Without any config file: ./pricing.yaml, and the check says no file is in use.
    bare = tmp_path / "bare"
    bare.mkdir()
    shutil.copy(bundled_pricing_path(), bare / "pricing.yaml")
    out = meterproxy("check", cwd=bare, env={"METERPROXY_CONFIG": ""})
    assert "config none (defaults; looked for --config, $METERPROXY_CONFIG" in out.stdout
    assert f"pricing {bare / 'pricing.yaml'}: OK" in out.stdout


def test_init_refuses_a_bad_url_and_guesses_the_provider(tmp_path: Path) -> None:
    bad = meterproxy("init", "--upstream", "api.openai.com", cwd=tmp_path)
    assert bad.returncode == 2 and "must be an http(s):// URL" in bad.stderr
    ok = meterproxy("init", "--upstream", "https://api.anthropic.com/v1", cwd=tmp_path)
    assert ok.returncode == 0, ok.stderr
    config = load_config(tmp_path / "meterproxy.yaml")
    upstream = config.default_upstream
    assert (upstream.provider, upstream.base_url) == ("anthropic", "https://api.anthropic.com")
    assert "ANTHROPIC_BASE_URL=http://127.0.0.1:8787" in (tmp_path / "meterproxy.yaml").read_text()


# -- 4. reload: every key is applied or named as needing a restart ---------------------------


def test_every_config_key_has_a_reload_rule() -> None:
    names = set()
    for f in dataclasses.fields(Config):
        if f.name in ("alerts", "timeouts"):
            nested = AlertsConfig if f.name == "alerts" else Timeouts
            names |= {f"{f.name}.{g.name}" for g in dataclasses.fields(nested)}
        else:
            names.add(f.name)
    assert set(RULES) == names
    assert set(RULES.values()) == {"live", "applied", "restart"}


async def test_webhooks_reload_and_restart_only_keys_warn(
    make_proxy: ProxyFactory, aiohttp_server: Any, tmp_path: Path, caplog: Any
) -> None:
    first, second = Receiver(), Receiver()
    url1 = await receiver_url(aiohttp_server, first)
    url2 = await receiver_url(aiohttp_server, second)
    path = tmp_path / "mp.yaml"
    ledger = f"sqlite:///{tmp_path / 'ledger.db'}"

    def config_text(url: str, port: int = 8787) -> dict[str, Any]:
        return {"server": {"port": port},
                "alerts": {"webhooks": [{"url": url}], "repeat_seconds": 0},
                "budgets": {"defaults": {"max_cost_per_day_usd": 0.00001}},
                "storage": {"url": ledger, "spool_dir": str(tmp_path / "spool")}}  # fmt: skip

    write(path, config_text(url1))
    base = load_config(path)
    proxy = await make_proxy(options=Options(reparse=lambda: load_config(path)), path=path,
                             policies=base.policies, alerts=base.alerts, db_url=base.db_url,
                             spool_dir=base.spool_dir)  # fmt: skip
    client = openai.AsyncOpenAI(base_url=proxy.url + "/v1", api_key="k", max_retries=0)
    with pytest.raises(openai.RateLimitError):
        await client.chat.completions.create(model="gpt-4o", messages=HI, max_tokens=2000)
    await wait_for(lambda: first.received, 10)

    caplog.set_level(logging.WARNING, logger="meterproxy")
    write(path, config_text(url2, port=9999))
    await wait_for(lambda: proxy.svc.config.alerts.webhooks[0][0] == url2)
    assert proxy.svc.config.port == proxy.config.port  # the running value stays shown
    warnings = [r.getMessage() for r in caplog.records if r.name == "meterproxy.reload"]
    assert warnings == ["config: server.port changed; it takes effect after a restart (until"
                        " then the old value stays)"]  # fmt: skip
    before = len(first.received)
    with pytest.raises(openai.RateLimitError):
        await client.chat.completions.create(model="gpt-4o", messages=HI, max_tokens=2000)
    await wait_for(lambda: second.received, 10)
    assert len(first.received) == before  # the old hook hears nothing more


# -- 5. check runs all of serve's validation and reports every error -----------------------


def test_check_reports_every_error_and_serve_rejects_the_same(tmp_path: Path) -> None:
    config = write(tmp_path / "bad.yaml", """\
server:
  port: 99999
  colour: blue
storage:
  url: mysql://root@db/meter
admin:
  token: short
alerts:
  webhooks:
    - url: ftp://hooks.example.com/x
budgets:
  timezone: Mars/Olympus
  defaults:
    max_cost_per_day_usd: lots
""")  # fmt: skip
    out = meterproxy("check", "--config", str(config), cwd=tmp_path)
    assert out.returncode == 2 and out.stdout == ""
    lines = out.stderr.splitlines()
    assert lines == [
        f"meterproxy: {config}:3: key 'server.colour': unknown key (known: allowed_hosts,"
        " allowed_origins, body_timeout, event_loop, host, keepalive_timeout, max_body_bytes,"
        " port, shutdown_grace_seconds)",
        f"meterproxy: {config}:2: key 'server.port': bad value 99999: must be <= 65535",
        f"meterproxy: {config}:5: key 'storage.url': bad value 'mysql://...': must be"
        " sqlite:///PATH (relative to the config file), sqlite:////ABSOLUTE/PATH, a plain path,"
        " or postgresql://USER@HOST:PORT/DB",
        f"meterproxy: {config}:7: key 'admin.token': bad value 'short': must be at least 16"
        " characters (meterproxy init generates one)",
        f"meterproxy: {config}:12: key 'budgets.timezone': bad value 'Mars/Olympus': is not a"
        " known time zone (e.g. UTC, Europe/Berlin)",
        f"meterproxy: {config}:14: key 'budgets.defaults.max_cost_per_day_usd': bad value"
        " 'lots': must be a number",
        f"meterproxy: {config}:10: key 'alerts.webhooks[0].url': bad value"
        " 'ftp://hooks.example.com/x': must be an http:// or https:// URL",
    ]
    serve = meterproxy("serve", "--config", str(config), cwd=tmp_path)
    assert serve.returncode == 2 and serve.stderr.splitlines()[0] == lines[0]


def test_check_catches_what_only_startup_would(tmp_path: Path) -> None:
    config = write(tmp_path / "mp.yaml", {
        "storage": {"url": "sqlite:///no/such/dir/mp.db"},
        "logging": {"file": "logs/mp.log"},
    })  # fmt: skip
    out = meterproxy("check", "--config", str(config), cwd=tmp_path)
    assert out.returncode == 2
    assert out.stderr.splitlines() == [
        f"meterproxy: {config}: key 'storage.url': the ledger's directory"
        f" {tmp_path / 'no' / 'such' / 'dir'} does not exist",
        f"meterproxy: {config}: key 'logging.file': the directory {tmp_path / 'logs'} does not"
        " exist",
    ]


# -- 6. logs ------------------------------------------------------------------------------------


async def test_with_a_log_file_the_terminal_still_shows_startup_and_warnings(
    tmp_path: Path, fake: tuple[FakeUpstream, str]
) -> None:
    upstream, upstream_url = fake
    write(tmp_path / "meterproxy.yaml", {
        "server": {"port": 0},
        "upstreams": [{"name": "main", "base_url": upstream_url}],
        "logging": {"file": "mp.log"},
        "budgets": {"agents": {"capped": {"max_cost_per_day_usd": 0.00001}}},
    })  # fmt: skip
    proc, port, lines = await start_serve(tmp_path)
    try:

        def client(agent: str) -> openai.AsyncOpenAI:
            return openai.AsyncOpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="k",
                                      max_retries=0, default_headers={"X-Agent-Id": agent})  # fmt: skip

        await client("fine").chat.completions.create(model="gpt-4o", messages=HI)
        with pytest.raises(openai.RateLimitError):
            await client("capped").chat.completions.create(model="gpt-4o", messages=HI,
                                                           max_tokens=100)  # fmt: skip
        upstream.script.update(status=503)
        with pytest.raises(openai.InternalServerError):
            await client("fine").chat.completions.create(model="gpt-4o", messages=HI)
    finally:
        await stop(proc, lines)
    terminal = "".join(lines)
    log = (tmp_path / "mp.log").read_text()
    assert "listening on http://127.0.0.1:" in terminal and "listening on" in log
    assert f"ledger {tmp_path / 'meterproxy.db'}" in terminal
    calls = [line for line in log.splitlines() if " agent=" in line]
    levels = {line.split()[3].split("=")[1]: line.split()[1] for line in calls}
    assert [line.split()[1] for line in calls] == ["INFO", "WARNING", "WARNING"]
    assert levels == {"fine": "WARNING", "capped": "WARNING"}  # last line per agent
    assert " 429 agent=capped" in terminal and " 503 agent=fine" in terminal
    assert " 200 agent=fine" not in terminal  # ordinary calls stay in the file
    assert "stopped" in terminal


async def test_a_refusal_shows_amounts_a_person_can_tell_apart(make_proxy: ProxyFactory) -> None:
    from proxy.config_file import parse_config

    policies = parse_config({"budgets": {"defaults": {"max_cost_per_day_usd": 0.0002}}}).policies
    proxy = await make_proxy(policies=policies)
    client = openai.AsyncOpenAI(base_url=proxy.url + "/v1", api_key="k", max_retries=0)
    for _ in range(2):
        await client.chat.completions.create(model="gpt-4o", messages=HI, max_tokens=10)
    long = [{"role": "user", "content": "word " * 40}]  # its input alone is over what remains
    with pytest.raises(openai.RateLimitError) as e:
        await client.chat.completions.create(model="gpt-4o", messages=long, max_tokens=10)
    message = e.value.body["message"]  # type: ignore[index]
    # 2 x $0.00008 spent of $0.0002: 4 decimals would print "$0.0002 of $0.0002".
    assert "used $0.000160 of $0.000200;" in message
    assert "could cost up to $0.000235 but only $0.000040 remains" in message


# -- 7. CLI typos and the table's digits --------------------------------------------------------


async def test_pausing_an_unknown_agent_needs_force(make_proxy: ProxyFactory) -> None:
    from proxy.cli import main

    proxy = await make_proxy(admin_token=TOKEN)
    await openai.AsyncOpenAI(base_url=f"{proxy.url}/agents/research-agent/v1", api_key="k",
                             max_retries=0).chat.completions.create(model="gpt-4o", messages=HI)  # fmt: skip
    await proxy.flushed()
    args = ["--url", proxy.url, "--token", TOKEN]
    code = await asyncio.to_thread(main, ["pause", "reserch-agent", *args])
    assert code == 2 and proxy.svc.enforcer.paused == {}
    async with aiohttp.ClientSession(headers=AUTH) as s:
        async with s.post(proxy.url + "/meter/agents/reserch-agent/pause") as r:
            assert r.status == 404
            body = (await r.json())["error"]
    assert body["code"] == "unknown_agent"
    assert "did you mean 'research-agent'?" in body["message"]
    assert await asyncio.to_thread(main, ["pause", "research-agent", *args]) == 0
    assert await asyncio.to_thread(main, ["pause", "new-agent", "--force", *args]) == 0
    assert set(proxy.svc.enforcer.paused) == {"research-agent", "new-agent"}


def test_pause_typo_message_on_the_terminal(tmp_path: Path) -> None:
    out = meterproxy("pause", "x", "--url", "http://127.0.0.1:9", "--token", TOKEN, cwd=tmp_path)
    assert out.returncode == 2 and "cannot reach the proxy at http://127.0.0.1:9" in out.stderr


async def test_the_table_report_shows_significant_digits(
    make_proxy: ProxyFactory, fake: tuple[FakeUpstream, str], tmp_path: Path
) -> None:
    proxy = await make_proxy()
    client = openai.AsyncOpenAI(base_url=proxy.url + "/v1", api_key="k", max_retries=0)
    await client.embeddings.create(model="text-embedding-3-small", input="hello")
    await client.chat.completions.create(model="gpt-4o", messages=HI)
    await proxy.flushed()
    db = proxy.config.db_url.removeprefix("sqlite:///")
    out = meterproxy("report", "--db", db, "--by", "model", cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    rows = {line.split()[0]: line.split()[-1] for line in out.stdout.splitlines()[2:4]}
    # 12 tokens x $0.02 per 1M = $0.00000024: three significant digits, not 0.000000.
    # One format for the column: 3 significant digits of its smallest cost.
    assert rows == {"gpt-4o": "0.000080000", "text-embedding-3-small": "0.000000240"}


# -- 9. end users and tags ------------------------------------------------------------------


def rows(proxy: Any) -> list[dict[str, Any]]:
    conn = sqlite3.connect(proxy.config.db_url.removeprefix("sqlite:///"))
    conn.row_factory = sqlite3.Row
    try:
        return [dict(r) for r in conn.execute("SELECT * FROM calls ORDER BY started_at")]
    finally:
        conn.close()


async def test_end_users_from_body_or_header_and_tags(make_proxy: ProxyFactory) -> None:
    proxy = await make_proxy(admin_token=TOKEN)
    client = openai.AsyncOpenAI(base_url=proxy.url + "/v1", api_key="k", max_retries=0,
                                default_headers={"X-Meter-Tags": "team=search, env=prod"})  # fmt: skip
    await client.chat.completions.create(model="gpt-4o", messages=HI, user="cust-1")
    await client.chat.completions.create(model="gpt-4o", messages=HI, safety_identifier="cust-2")
    await client.chat.completions.create(model="gpt-4o", messages=HI, user="cust-1",
                                         extra_headers={"X-Meter-User": "cust-3"})  # fmt: skip
    with pytest.raises(openai.BadRequestError) as e:
        await client.chat.completions.create(model="gpt-4o", messages=HI,
                                             extra_headers={"X-Meter-Tags": "team"})  # fmt: skip
    assert e.value.body["code"] == "invalid_tags"  # type: ignore[index]
    await proxy.flushed()
    got = [(r["end_user"], r["tags"]) for r in rows(proxy) if r["status"] == 200]
    assert got == [("cust-1", "env=prod,team=search"), ("cust-2", "env=prod,team=search"),
                   ("cust-3", "env=prod,team=search")]  # fmt: skip

    async with aiohttp.ClientSession(headers=AUTH) as s:
        async with s.get(proxy.url + "/meter/spend?by=user") as r:
            by_user = {
                row["user"]: row["llm_calls"] for row in (await r.json())["rows"] if row["user"]
            }
        async with s.get(proxy.url + "/meter/spend?by=tag:team") as r:
            by_team = {
                row["tag:team"]: row["cost_usd"]
                for row in (await r.json())["rows"]
                if row["tag:team"]
            }
    assert by_user == {"cust-1": 1, "cust-2": 1, "cust-3": 1}
    assert by_team == {"search": "0.00024"}


async def test_hashed_end_users(make_proxy: ProxyFactory) -> None:
    from proxy.attribution import user_digest

    proxy = await make_proxy(hash_users=True, user_hash_salt="pepper-123")
    client = openai.AsyncOpenAI(base_url=proxy.url + "/v1", api_key="k", max_retries=0)
    await client.chat.completions.create(model="gpt-4o", messages=HI, user="alice@example.com")
    await proxy.flushed()
    (row,) = rows(proxy)
    assert row["end_user"] == user_digest("alice@example.com", "pepper-123")
    assert row["end_user"].startswith("u_") and "alice" not in row["end_user"]
