"""Fault drills on real Ray actors: SIGKILL a generator, a judge, a learner or the driver mid-run.

Prints one row per drill: whether the run recovered and finished, how long the recovery took,
samples lost with the dead actor (ledger fate `actor_lost`: re-issued, generated again) and
samples trained twice. A killed learner or driver is recovered by `run.resume`; its recovery
time runs from the kill to the resumed run's first new step, and the steps after the last
checkpoint are done again.

Usage: python bench/faults.py [--steps 20] [--kill-at 8] [--out DIR] [extra overrides ...]
The helpers are shared with tests/faults/.
"""
import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
QUICK = ("task.eval_prompts=32", "run.progress=false", "ray.dashboard=false")
RUN_TIMEOUT_S = 400


def start(run_dir: Path, *overrides: str) -> subprocess.Popen:
    args = [sys.executable, "run.py", f"run.out_dir={run_dir.parent}", f"run.name={run_dir.name}", *QUICK, *overrides]
    return subprocess.Popen(args, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def resume(run_dir: Path, *overrides: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "run.py", f"run.resume={run_dir}", *overrides], cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def finish(proc: subprocess.Popen, returncode: int = 0) -> str:
    output, _ = proc.communicate(timeout=RUN_TIMEOUT_S)
    assert proc.returncode == returncode, output[-4000:]
    return output


def step_records(run_dir: Path) -> list[dict]:
    """The step records the run has written so far; a line still being written (no newline yet) is left out."""
    path = run_dir / "metrics.jsonl"
    lines = path.read_text().split("\n")[:-1] if path.exists() else []
    return [record for record in map(json.loads, lines) if "step" in record]


def wait_for_step(run_dir: Path, steps: int, proc: subprocess.Popen) -> None:
    deadline = time.monotonic() + RUN_TIMEOUT_S
    while len(step_records(run_dir)) < steps:
        assert proc.poll() is None, proc.communicate()[0][-4000:]
        assert time.monotonic() < deadline, f"{run_dir} did not reach step {steps}"
        time.sleep(0.1)


def pid_of(run_dir: Path, actor: str) -> int:
    return json.loads((run_dir / "actors.json").read_text())[actor]["pid"]


def summary_of(run_dir: Path) -> dict:
    return json.loads((run_dir / "summary.json").read_text())


def kill_actor(run_dir: Path, actor: str, overrides: list[str], kill_at: int) -> dict:
    """A generator or judge: the supervisor replaces it and the run goes on."""
    proc = start(run_dir, *overrides)
    wait_for_step(run_dir, kill_at, proc)
    killed_at = time.time()
    os.kill(pid_of(run_dir, actor), signal.SIGKILL)
    finish(proc)
    [fault] = summary_of(run_dir)["faults"]
    return {"recovery_s": fault["seen_at"] - killed_at + fault["recovered_s"], "steps_redone": 0}


def kill_and_resume(run_dir: Path, actor: str, overrides: list[str], kill_at: int) -> dict:
    """The learner or the driver: the run stops (or vanishes), `run.resume` continues it."""
    proc = start(run_dir, *overrides)
    wait_for_step(run_dir, kill_at, proc)
    killed_at = time.time()
    if actor == "driver":
        proc.kill()
        proc.wait()
    else:
        os.kill(pid_of(run_dir, actor), signal.SIGKILL)
        finish(proc, returncode=1)
    done = len(step_records(run_dir))
    resumed = resume(run_dir)
    first_new = _first_new_step_wall(run_dir, resumed)
    finish(resumed)
    checkpoint_step = min(r["step"] for r in step_records(run_dir) if r["wall"] > killed_at)
    return {"recovery_s": first_new - killed_at, "steps_redone": done - checkpoint_step}


def _first_new_step_wall(run_dir: Path, proc: subprocess.Popen) -> float:
    """Wall clock of the first step the resumed run records."""
    started = time.time()
    deadline = time.monotonic() + RUN_TIMEOUT_S
    while not any(r["wall"] > started for r in step_records(run_dir)):
        assert proc.poll() is None or any(r["wall"] > started for r in step_records(run_dir)), \
            proc.communicate()[0][-4000:]
        assert time.monotonic() < deadline
        time.sleep(0.1)
    return min(r["wall"] for r in step_records(run_dir) if r["wall"] > started)


def drill_row(name: str, run_dir: Path, outcome: dict) -> dict:
    summary = summary_of(run_dir)
    samples = summary["samples"]
    accounted = samples["in_flight_at_end"] == 0 and \
        samples["generated"] == samples["trained"] + sum(samples["dropped"].values())
    return {"fault": name, "recovered": summary["status"] == "finished" and accounted,
            "recovery s": outcome["recovery_s"], "steps redone": outcome["steps_redone"],
            "samples lost": samples["dropped"].get("actor_lost", 0), "trained twice": samples["trained_twice"],
            "generated": samples["generated"], "trained": samples["trained"]}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--kill-at", type=int, default=8)
    parser.add_argument("--out", default="")
    args, extra = parser.parse_known_args()
    common = [f"run.steps={args.steps}", "run.checkpoint_every=5", *extra]
    drills = [("generator killed", "generator-1", kill_actor, ["generator.num=2"]),
              ("judge killed", "judge-0", kill_actor, []),
              ("learner killed, resumed", "learner-0", kill_and_resume, []),
              ("driver killed, resumed", "driver", kill_and_resume, [])]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(args.out or tmp)
        for index, (name, actor, drill, overrides) in enumerate(drills):
            run_dir = out / f"drill-{index}"
            rows.append(drill_row(name, run_dir, drill(run_dir, actor, [*common, *overrides], args.kill_at)))
    print(f"| {' | '.join(rows[0])} |")
    print(f"|{'---|' * len(rows[0])}")
    for row in rows:
        print("| " + " | ".join(f"{v:.1f}" if isinstance(v, float) else str(v) for v in row.values()) + " |")


if __name__ == "__main__":
    main()
