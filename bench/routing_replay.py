"""Routing replay (R3) on and off, side by side: IcePop masked fraction and mismatch KL.

Runs `run.py` twice with the same seed and overrides, once with
`algo.routing_replay=false` and once with `true`, and prints the mean over RL steps of
the fraction of tokens IcePop masks and of the k3 mismatch KL, overall and for tokens
one version stale. Usage: `python bench/routing_replay.py [extra overrides ...]`.
"""
import json
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
DEFAULTS = ["run.steps=150", "learner.warmup_steps=800", "ray.dashboard=false", "run.progress=false"]


def run(out_dir: Path, replay: bool, extra: list[str]) -> list[dict]:
    name = f"r3-{'on' if replay else 'off'}"
    subprocess.run([sys.executable, "run.py", f"run.out_dir={out_dir}", f"run.name={name}",
                    f"algo.routing_replay={str(replay).lower()}", *DEFAULTS, *extra],
                   cwd=REPO, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    lines = (out_dir / name / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if "loss" in r]


def mean(steps: list[dict], key: str) -> float:
    values = [s[key] for s in steps if key in s]
    return sum(values) / len(values) if values else float("nan")


def main(extra: list[str]) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        results = {replay: run(Path(tmp), replay, extra) for replay in (False, True)}
    keys = ["masked_below_alpha_frac", "masked_above_beta_frac", "mismatch_kl", "lag/1/mismatch_kl",
            "lag/1/masked_frac"]
    print(f"{'metric (mean over RL steps)':32} {'R3 off':>12} {'R3 on':>12} {'on/off':>8}")
    for key in keys:
        off, on = mean(results[False], key), mean(results[True], key)
        ratio = on / off if off else float("nan")
        print(f"{key:32} {off:12.3e} {on:12.3e} {ratio:8.3f}")


if __name__ == "__main__":
    main(sys.argv[1:])
