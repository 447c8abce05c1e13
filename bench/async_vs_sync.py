"""Asynchronous (C3PO++ rounds, eta = 1) against synchronous RL on the long-tail task.

One invocation: a shared warm-up checkpoint, then a synchronous and an asynchronous
run started from it with the same actors and the same wall-time budget. Prints
completed samples per second, trained tokens per second, generator busy fraction,
model FLOPs utilisation and held-out accuracy (at the end, and for async also at the
number of samples the synchronous run trained), with the async/sync ratios; then the
overlap bound measured from the synchronous run's own phase times and the efficiency
(the async/sync ratio of completed samples over that bound).

Usage: python bench/async_vs_sync.py [--budget-s 150] [--round-tokens 8000] [--out DIR] [extra overrides ...]
(--round-tokens 0: plain streaming async, batches of prompts_per_step groups.)
"""
import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path
from statistics import mean

REPO = Path(__file__).resolve().parent.parent
TASK = ["task.name=carry_add_longtail", "generator.max_new_tokens=64", "model.max_seq_len=80",
        "ray.dashboard=false", "run.progress=false"]


def run_ringrl(out_dir: Path, name: str, *overrides: str) -> dict:
    subprocess.run([sys.executable, "run.py", f"run.out_dir={out_dir}", f"run.name={name}", *TASK, *overrides],
                   cwd=REPO, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    summary = json.loads((out_dir / name / "summary.json").read_text())
    steps = [json.loads(line) for line in (out_dir / name / "metrics.jsonl").read_text().splitlines()]
    summary["steps_records"] = [s for s in steps if "step" in s]
    return summary


def figures(summary: dict) -> dict:
    wall = summary["rl_wall_s"]
    generator = summary["actors"]["generator-0"]
    learner = summary["actors"]["learner-0"]
    milestone = [s["eval_accuracy"] for s in summary["steps_records"] if "eval_accuracy" in s]
    return {"completed samples/s": (generator["generated_samples"] - generator.get("dropped_purged", 0)) / wall,
            "trained tokens/s": learner.get("trained_tokens", 0) / wall,
            "generator busy fraction": generator["busy_s"] / wall,
            "trained samples": learner.get("trained_samples", 0),
            "accuracy after warm-up": summary["evaluations"]["after_warmup"]["accuracy"],
            "accuracy at the end": summary["evaluations"]["after_rl"]["accuracy"],
            "accuracy at sync's trained samples": milestone[0] if milestone else None,
            **{f"MFU {key.removeprefix('mfu/')}": value for key, value in summary.get("mfu", {}).items()},
            "RL wall s": wall}


def overlap_bound(steps: list[dict]) -> float:
    """The most overlap can gain over the synchronous loop whose step records these are.

    A synchronous step generates its batch (admission, then collecting it: generation and the
    scoring wait), then trains and syncs weights; overlapped, a step takes the slower of the two.
    """
    generation = mean(s["time/admit_s"] + s["time/collect_s"] for s in steps)
    training = mean(s["time/train_s"] + s["time/weight_sync_s"] for s in steps)
    return (generation + training) / max(generation, training)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--budget-s", type=float, default=150.0)
    parser.add_argument("--round-tokens", type=int, default=8000)
    parser.add_argument("--warmup-steps", type=int, default=800)
    parser.add_argument("--out", default="", help="keep the runs here; a warm-up already there is reused")
    args, extra = parser.parse_known_args()
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(args.out or tmp)
        if not (out / "warm" / "checkpoints").is_dir():
            run_ringrl(out, "warm", f"learner.warmup_steps={args.warmup_steps}", "run.steps=0", *extra)
        common = [f"run.init_from={out / 'warm'}", f"run.time_budget_s={args.budget_s}",
                  "run.steps=100000", *extra]
        sync_summary = run_ringrl(out, "sync", "algo.mode=sync", *common)
        sync = figures(sync_summary)
        asyn = figures(run_ringrl(out, "async", "algo.mode=async", "algo.max_staleness=1",
                                  f"algo.round_token_budget={args.round_tokens}", "run.on_actor_failure=stop",
                                  f"run.eval_at_trained_samples={sync['trained samples']}", *common))
    print(f"{'figure':36} {'sync':>10} {'async':>10} {'async/sync':>11}")
    for key in sync:
        s, a = sync[key], asyn.get(key)
        ratio = f"{a / s:11.2f}" if s and a is not None else ""
        print(f"{key:36} {_cell(s)} {_cell(a)} {ratio}")
    bound = overlap_bound(sync_summary["steps_records"])
    ratio = asyn["completed samples/s"] / sync["completed samples/s"]
    print(f"overlap bound from sync's phases {bound:.2f}; async/sync completed samples {ratio:.2f}; "
          f"efficiency {ratio / bound:.2f}")


def _cell(value) -> str:
    return f"{'-':>10}" if value is None else f"{value:10.4g}"


if __name__ == "__main__":
    main()
