"""`meterproxy serve --workers N`: N proxy processes on one port (SO_REUSEPORT).

The kernel spreads new connections over the workers; budgets hold across them because
they live in PostgreSQL. This parent only starts the workers (the same command line, with
`METERPROXY_WORKER` set), passes signals on (SIGTERM/SIGINT: drain and stop; a second one:
stop now; SIGHUP: reload), and starts a worker again if one dies on its own.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import time
from types import FrameType

log = logging.getLogger("meterproxy")
WORKER_ENV = "METERPROXY_WORKER"
_RESTART_AFTER = 1.0  # a worker that died is started again after this, at most once a second
_FAILED_AT_START = 2  # a worker exiting 2 (config/storage error): the others would too


def worker_number() -> int | None:
    value = os.environ.get(WORKER_ENV)
    return int(value) if value and value.isdigit() else None


def supervise(count: int, argv: list[str]) -> int:
    """Run `count` workers with the command line `argv` until a signal stops them."""
    workers: dict[int, subprocess.Popen[bytes]] = {}
    stopping = False

    def start(n: int) -> None:
        env = {**os.environ, WORKER_ENV: str(n)}
        workers[n] = subprocess.Popen([sys.executable, "-m", "proxy", *argv], env=env)

    def forward(signum: int, _frame: FrameType | None) -> None:
        nonlocal stopping
        if signum in (signal.SIGTERM, signal.SIGINT):
            stopping = True
        for proc in workers.values():
            if proc.poll() is None:
                proc.send_signal(signum)

    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, forward)
    for n in range(1, count + 1):
        start(n)
    log.info("meterproxy: %d workers started (pids %s)", count,
             ", ".join(str(p.pid) for p in workers.values()))  # fmt: skip
    code = 0
    while workers:
        time.sleep(0.2)
        for n, proc in list(workers.items()):
            status = proc.poll()
            if status is None:
                continue
            del workers[n]
            if stopping:
                code = max(code, status if status > 0 else 0)
                continue
            if status == _FAILED_AT_START:
                log.error("worker %d exited with %d: stopping the others", n, status)
                forward(signal.SIGTERM, None)
                code = status
                continue
            log.error("worker %d (pid %d) exited with %d: starting it again", n, proc.pid, status)
            time.sleep(_RESTART_AFTER)
            start(n)
    return code
