from __future__ import annotations

from pathlib import Path

import pytest

from proxy.config import ConfigError
from proxy.config_file import load_config


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "meterproxy.yaml"
    path.write_text(text)
    return path


def test_defaults_without_a_file() -> None:
    config = load_config(None)
    assert (config.host, config.port) == ("127.0.0.1", 8787)
    assert config.default_upstream.base_url == "https://api.openai.com/v1"
    assert config.db_url == f"sqlite:///{Path.cwd() / 'meterproxy.db'}"
    assert config.pricing_path.name == "pricing.yaml"


def test_example_config_is_valid(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OPENAI_API_KEY", "sk-example")
    monkeypatch.setenv("ANTHROPIC_API_KEY", "sk-ant-example")
    monkeypatch.setenv("METERPROXY_ADMIN_TOKEN", "a-long-enough-admin-token")
    root = Path(__file__).resolve().parent.parent
    config = load_config(root / "config.example.yaml")
    assert config.upstream_for("claude-sonnet-4-5").name == "anthropic-compat"
    assert config.upstream_for("claude-sonnet-4-5", "anthropic").name == "anthropic"
    assert config.upstream_for("gpt-4o").name == "openai"
    assert config.policies.agents["research-agent"].cost["day"] == 50 * 10**12


def test_env_expansion(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MY_KEY", "sk-from-env")
    path = write(
        tmp_path, "upstreams:\n  - {name: o, base_url: 'https://x/v1', api_key: '${MY_KEY}'}\n"
    )
    assert load_config(path).upstreams[0].api_key == "sk-from-env"


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("server:\n  port: 99999\n", ":2: key 'server.port': bad value 99999: must be <= 65535"),
        ("server:\n  prot: 1\n", ":2: key 'server.prot': unknown key"),
        ("budgets:\n  timezone: Mars/Olympus\n", "key 'budgets.timezone': bad value 'Mars/Olympus'"),
        (
            "budgets:\n  agents:\n    a1:\n      max_cost_per_day_usd: -3\n",
            ":4: key 'budgets.agents.a1.max_cost_per_day_usd': bad value -3: must be >= 0",
        ),
        (
            "budgets:\n  defaults:\n    action_on_breach: explode\n",
            "key 'budgets.defaults.action_on_breach': bad value 'explode': must be one of block, alert, pause",
        ),
        (
            "upstreams:\n  - {name: o, base_url: 'https://x/v1', api_key: '${NOPE_UNSET}'}\n",
            "key 'upstreams[0].api_key': environment variable NOPE_UNSET is not set",
        ),
        ("upstreams:\n  - {name: o, base_url: 'ftp://x'}\n", "must be an http:// or https:// URL"),
        (
            "keys:\n  mp-key-12345678: a1\nupstreams:\n  - {name: o, base_url: 'https://x/v1'}\n",
            "key 'upstreams[0].api_key': is required when proxy keys are configured",
        ),
        ("server: [1, 2]\n", "key 'server': bad value [1, 2]: must be a mapping"),
        ("pricing:\n  unknown_model: maybe\n", "must be one of allow, block"),
        ("server:\n  port: [\n", "not valid YAML"),
        ("storage:\n  on_storage_error: maybe\n", "must be one of closed, open"),
        ("storage:\n  pool_size: 0\n", "key 'storage.pool_size': bad value 0: must be >= 1"),
    ],
)  # fmt: skip
def test_errors_name_file_line_key_and_value(tmp_path: Path, text: str, expected: str) -> None:
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as e:
        load_config(path)
    message = str(e.value)
    assert message.startswith(str(path))
    assert expected in message
    assert "\n" not in message


def test_an_upstream_key_with_a_line_break_is_refused_and_not_shown(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A key read from a file often ends in a newline; in a header it would end the
    header early. Refused at load, naming the key, never printing it."""
    monkeypatch.setenv("KEY_FROM_FILE", "sk-secret-123\n")
    path = write(
        tmp_path,
        "upstreams:\n  - {name: o, base_url: 'https://x/v1', api_key: '${KEY_FROM_FILE}'}\n",
    )
    with pytest.raises(ConfigError) as e:
        load_config(path)
    message = str(e.value)
    assert "key 'upstreams[0].api_key': holds a line break or another control character" in message
    assert "sk-secret" not in message


def test_the_example_config_shows_every_key() -> None:
    """Every key the parser accepts appears in config.example.yaml (as a key or in a
    comment): the file is where people look them up."""
    import re

    from proxy import config_file

    source = Path(config_file.__file__).read_text()
    example = (Path(__file__).resolve().parent.parent / "config.example.yaml").read_text()
    # The keys each section accepts: the tuples handed to check_unknown.
    known = set()
    for block in re.findall(r"check_unknown\(\s*\(([^)]*)\)", source):
        known |= set(re.findall(r'"([a-z_]+)"', block))
    assert len(known) > 60
    missing = sorted(k for k in known if not re.search(rf"\b{k}:", example))
    assert missing == []
