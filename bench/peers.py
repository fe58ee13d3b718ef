"""Other proxies measured in the same run: `python -m bench --peer litellm`.

LiteLLM is installed on first use into its own virtualenv (`.bench-peers/litellm`, next
to the repository's `.venv`), never into meterproxy's: its dependency tree is large and
pins its own versions of libraries meterproxy uses. It runs as its docs show for a
single machine: one worker, no database, the model routed to the same fake upstream.
"""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
from pathlib import Path
from typing import Any

from bench.__main__ import Process, pinned
from bench.loadgen import Result

ROOT = Path(__file__).resolve().parent.parent / ".bench-peers"
LITELLM_VERSION = "1.108.7"  # the version the figures came from


def litellm_bin(version: str = LITELLM_VERSION) -> Path:
    """The `litellm` command of a virtualenv holding exactly `version` (installed now if
    missing: a few minutes, from the package index)."""
    venv = ROOT / "litellm"
    python, command = venv / "bin" / "python", venv / "bin" / "litellm"
    if python.exists() and installed_version(python) == version and command.exists():
        return command
    print(f"installing litellm[proxy]=={version} into {venv} ...", flush=True)
    if not python.exists():
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    subprocess.run(
        [str(python), "-m", "pip", "install", "-q", f"litellm[proxy]=={version}"], check=True
    )
    return command


def installed_version(python: Path) -> str | None:
    out = subprocess.run(
        [str(python), "-c", "import importlib.metadata as m; print(m.version('litellm'))"],
        capture_output=True,
        text=True,
    )
    return out.stdout.strip() if out.returncode == 0 else None


def start_litellm(port: int, upstream_url: str, workdir: Path) -> Process:
    command = litellm_bin()
    config = {
        "model_list": [
            {
                "model_name": "gpt-4o",
                "litellm_params": {
                    "model": "openai/gpt-4o",
                    "api_base": upstream_url + "/v1",
                    "api_key": "sk-bench",
                },
            }
        ],
        "litellm_settings": {"telemetry": False},
    }
    path = workdir / "litellm.yaml"
    path.write_text(json.dumps(config))  # YAML is a superset of JSON
    env = {
        # the price map bundled with the package, not fetched from GitHub
        "LITELLM_LOCAL_MODEL_COST_MAP": "True",
        # no master key: like meterproxy's bench, nothing checks a key
        "LITELLM_DANGEROUSLY_PERMIT_WEAK_OR_UNSET_MASTER_KEY": "true",
    }
    argv = [str(command), "--config", str(path), "--port", str(port), "--num_workers", "1"]
    return Process("litellm", pinned(0, argv), port, workdir / "litellm.log", env)


def report_peer(
    args: Any,
    throughput: dict[tuple[str, str], list[float]],
    lat: dict[tuple[str, str], Result],
    procs: dict[str, Process],
) -> None:
    from bench.__main__ import SCENARIOS, ms, table

    print(f"\nLiteLLM {LITELLM_VERSION} (1 worker, no database), same rounds:")
    rows = []
    for scenario in SCENARIOS:
        m = throughput[("meterproxy", scenario)]
        peer = throughput[("litellm", scenario)]
        ratios = [a / b for a, b in zip(m, peer, strict=True) if b]
        rows.append(
            [
                scenario,
                f"{statistics.median(peer):.0f}",
                f"{statistics.median(m):.0f}",
                f"{statistics.median(ratios):.1f}x" if ratios else "-",
            ]
        )
    print(table(["scenario", "litellm", "meterproxy", "meterproxy / litellm"], rows))
    key = "json, peer rate"
    base = lat[("upstream", key)]
    rows = []
    added: dict[str, float] = {}
    for name in ("upstream", "floor", "meterproxy", "litellm"):
        r = lat[(name, key)]
        added[name] = r.pct(r.latencies, 50) - base.pct(base.latencies, 50)
        rows.append(
            [
                "direct" if name == "upstream" else name,
                ms(r.pct(r.latencies, 50)),
                ms(r.pct(r.latencies, 99)),
                ms(added[name]),
                ms(r.pct(r.latencies, 99) - base.pct(base.latencies, 99)),
                str(r.errors),
            ]
        )
    print(
        f"\nLatency (ms), JSON, open loop at {args.peer_rate:g} calls/s (what LiteLLM keeps up"
        f" with), {args.latency_seconds:g} s per target in two halves:"
    )
    print(table(["", "p50", "p99", "+p50", "+p99", "errors"], rows))
    if added["litellm"] > 0:
        print(
            f"meterproxy adds {added['meterproxy'] / added['litellm']:.3f} of LiteLLM's added p50"
        )
    print(f"RSS: litellm {procs['litellm'].rss_mb():.0f} MB")
