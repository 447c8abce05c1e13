"""Watching a live run: Ray's Prometheus endpoint carries every role's figures, tagged by actor,
and they move; a run whose stdout is a file logs status lines, never a carriage return."""
import os
import re
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from tests.conftest import REPO_ROOT

pytestmark = pytest.mark.slow

ROLES = {"generator": "generator-0", "judge": "judge-0", "learner": "learner-0", "driver": "driver"}
SCRAPE_EVERY_S = 2.0


def scrape(url: str) -> dict[str, float]:
    """ringrl's samples of a Prometheus text page (Ray prefixes `ray_`): {'name{labels}': value}."""
    text = urllib.request.urlopen(url, timeout=10).read().decode()
    return {line.rsplit(" ", 1)[0]: float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
            if line.startswith("ray_ringrl_")}


def by_role(samples: dict[str, float]) -> dict[str, dict[str, float]]:
    return {role: {k: v for k, v in samples.items() if k.startswith(f"ray_ringrl_{role}_") and f'actor="{actor}"' in k}
            for role, actor in ROLES.items()}


def test_live_metrics_and_status_lines_in_a_file(tmp_path):
    log = tmp_path / "driver.log"
    env = {**os.environ, "RAY_metrics_report_interval_ms": "1000"}  # Ray's default is 10 s
    proc = subprocess.Popen([sys.executable, "run.py", f"run.out_dir={tmp_path}", "run.name=watched",
                             "ray.dashboard=false", "learner.warmup_steps=100", "run.steps=100000", "run.time_budget_s=30",
                             "run.log_every_s=2"],
                            cwd=REPO_ROOT, stdout=open(log, "w"), stderr=subprocess.STDOUT, env=env)
    try:
        deadline = time.monotonic() + 300
        while not (url := re.search(r"Ray metrics \(Prometheus\): (http://\S+/metrics)", log.read_text())):
            assert proc.poll() is None and time.monotonic() < deadline, log.read_text()[-3000:]
            time.sleep(0.5)
        readings = []
        while proc.poll() is None and not _every_role_moved(readings):
            try:
                readings.append(by_role(scrape(url.group(1))))
            except urllib.error.URLError:  # the node's metrics agent is still starting
                pass
            time.sleep(SCRAPE_EVERY_S)
        assert _every_role_moved(readings), readings[-1] if readings else "no scrape"
    finally:
        proc.wait(timeout=600)
    output = log.read_text()
    assert proc.returncode == 0, output[-3000:]
    assert "\r" not in output
    status = [line for line in output.splitlines() if re.search(r"driver-0 (warm-up|evaluation|RL) \d+/\d+", line)]
    rl_lines = [line for line in status if " RL " in line]
    assert len(rl_lines) >= 5 and all("reward" in line and "tokens per s" in line for line in rl_lines), status
    rl_seconds = [_seconds(line) for line in rl_lines][:-1]  # the last line comes at the end
    assert all(b - a >= 1 for a, b in zip(rl_seconds, rl_seconds[1:])), status  # one per 2 s (logged to the second)
    assert any("warm-up" in line for line in status) and any("evaluation" in line for line in status), status


def _every_role_moved(readings: list[dict]) -> bool:
    """Each role has a figure whose value changed between two scrapes."""
    return all(_moved([reading[role] for reading in readings]) for role in ROLES)


def _moved(samples: list[dict[str, float]]) -> bool:
    first = {}
    for reading in samples:
        for key, value in reading.items():
            if first.setdefault(key, value) != value:
                return True
    return False


def _seconds(line: str) -> int:
    hours, minutes, seconds = map(int, line[:8].split(":"))
    return hours * 3600 + minutes * 60 + seconds
