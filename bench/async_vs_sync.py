"""Synchronous RL against plain streaming async and async with C3PO++ rounds, over several seeds.

One invocation: a shared warm-up checkpoint, then per seed a synchronous run, a plain
asynchronous run and one with C3PO++ rounds (both at eta = --eta), all from that checkpoint with
the same actors and the same budget of RL seconds (evaluations pause the clock). Each run is
evaluated on the held-out prompts on a fixed grid of RL seconds, and the asynchronous runs once
more when they have trained as many samples as that seed's synchronous run.

Prints the machine's fp32 matmul peak (the MFU denominator: how fast this machine is), then per
mode the mean over seeds (and the range) of: completed samples/s, trained tokens/s,
the generator's busy share, MFU, accuracy at the end and at sync's trained samples, maximum lag,
IcePop's masked fraction and mean |log k| by lag; the overlap bound measured from each sync
run's own phase times and the efficiency (async/sync completed samples over that bound), and the
same bound and efficiency with each role slowed as much as it was when both ran at once (on a
machine whose cores they share; tokens per busy second of each role, async against sync); the RL
seconds each mode's mean accuracy curve takes to reach the target accuracy (default: the mean
final accuracy of the sync runs), with async/sync ratios, and the same at accuracies on the way up
to the target; and writes time_to_accuracy.png.

Usage: python bench/async_vs_sync.py [--seeds 3] [--budget-s 60] [--eval-every-s 10]
       [--round-tokens 6000] [--eta 1] [--eval-prompts 1024] [--target ACC]
       [--modes sync,async,c3po (also: sync-streamed)]
       [--report-only | --reuse] [--out DIR] [overrides ...]
"""
import argparse
import json
import shutil
import subprocess
import sys
from pathlib import Path
from statistics import mean

import numpy as np

REPO = Path(__file__).resolve().parent.parent
# RL at lr 2.5e-4: at the default 5e-4 runs of either mode collapsed for tens of seconds now and
# then, and async ones more often (bench/RESULTS.md, "Learning per sample")
TASK = ["task.name=carry_add_longtail", "generator.max_new_tokens=64", "model.max_seq_len=80",
        "learner.lr=2.5e-4", "ray.dashboard=false", "run.progress=false"]
MODES = ("sync", "async", "c3po")  # the default; also sync-streamed (see mode_overrides)
LADDER_RUNGS = 6  # accuracies at which time to accuracy is also printed


def run_ringrl(out_dir: Path, name: str, *overrides: str) -> dict:
    shutil.rmtree(out_dir / name, ignore_errors=True)  # a run directory is appended to
    subprocess.run([sys.executable, "run.py", f"run.out_dir={out_dir}", f"run.name={name}", *TASK, *overrides],
                   cwd=REPO, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return read_run(out_dir, name)


def read_run(out_dir: Path, name: str) -> dict:
    summary = json.loads((out_dir / name / "summary.json").read_text())
    steps = [json.loads(line) for line in (out_dir / name / "metrics.jsonl").read_text().splitlines()]
    summary["steps_records"] = [s for s in steps if "step" in s]
    return summary


def mode_overrides(mode: str, round_tokens: int, eta: int) -> list[str]:
    """sync is synchronous RL as others run it: the learner starts on a batch once it is all there;
    sync-streamed is the same with the learner computing the batch's groups as they arrive."""
    if mode == "sync":
        return ["algo.mode=sync", "learner.stream_groups=0"]
    if mode == "sync-streamed":
        return ["algo.mode=sync"]
    rounds = round_tokens if mode == "c3po" else 0
    return ["algo.mode=async", f"algo.max_staleness={eta}", f"algo.round_token_budget={rounds}",
            "run.on_actor_failure=stop"]


def figures(summary: dict, milestone: int) -> dict:
    """One run's figures; `milestone`: the trained samples at which its accuracy is read (0: none)."""
    wall = summary["rl_wall_s"]
    generator = summary["actors"]["generator-0"]
    steps = summary["steps_records"]
    at_milestone = [s["eval_accuracy"] for s in steps if "eval_accuracy" in s and milestone
                    and s["trained_samples"] >= milestone]
    return {"completed samples/s": (generator["generated_samples"] - generator.get("dropped_purged", 0)) / wall,
            "trained tokens/s": summary["actors"]["learner-0"].get("trained_tokens", 0) / wall,
            "generator busy fraction": generator["busy_s"] / wall,
            "trained samples": summary["actors"]["learner-0"].get("trained_samples", 0),
            "accuracy at the end": summary["evaluations"]["after_rl"]["accuracy"],
            "accuracy at sync's trained samples": at_milestone[0] if at_milestone else None,
            **{f"MFU {key.removeprefix('mfu/')}": value for key, value in summary.get("mfu", {}).items()},
            **role_speeds(summary), **lag_figures(steps)}


def role_speeds(summary: dict) -> dict:
    """How fast each role works while it works: tokens per second decoding, and per second training."""
    generator, learner = summary["actors"]["generator-0"], summary["actors"]["learner-0"]
    return {"generator tokens per busy second": generator["generated_tokens"] / generator["busy_s"],
            "learner tokens per training second": learner.get("trained_tokens", 0) / learner["phases"]["training"]}


def lag_figures(steps: list[dict]) -> dict:
    """Maximum policy lag trained on, and IcePop's masked fraction and mean |log k| per lag,
    weighted by each step's tokens at that lag."""
    lags = sorted({int(lag) for s in steps for lag in s.get("lag_histogram", {})})
    out = {"max lag": max(lags) if lags else None}
    for lag in lags:
        weighted = [(s[f"lag/{lag}/tokens"], s) for s in steps if s.get(f"lag/{lag}/tokens")]
        tokens = sum(w for w, _ in weighted)
        for name, key in (("masked", "masked_frac"), ("mean |log k|", "mean_abs_log_k")):
            out[f"lag {lag} {name}"] = sum(w * s[f"lag/{lag}/{key}"] for w, s in weighted) / tokens
    return out


def step_halves(steps: list[dict]) -> tuple[float, float]:
    """The mean seconds of a synchronous step's two halves: generating its batch (admission, then
    collecting it: generation and the scoring wait), and training on it with the weight sync."""
    return (mean(s["time/admit_s"] + s["time/collect_s"] for s in steps),
            mean(s["time/train_s"] + s["time/weight_sync_s"] for s in steps))


def overlap_bound(steps: list[dict]) -> float:
    """The most overlap can gain over the synchronous loop whose step records these are:
    overlapped, a step takes the slower of its two halves."""
    generation, training = step_halves(steps)
    return (generation + training) / max(generation, training)


def machine_bound(steps: list[dict], sync_speeds: dict, overlapped_speeds: dict) -> float:
    """The overlap bound once each role works at the speed it had when both ran at once.

    On a machine whose cores the roles share, a role is slower beside the other than alone (as
    in a sync run): overlapped, a step takes the slower of the two halves, each slowed by its
    own ratio of speeds.
    """
    generation, training = step_halves(steps)
    slowdown = {key: sync_speeds[key] / overlapped_speeds[key] for key in sync_speeds}
    return (generation + training) / max(generation * slowdown["generator tokens per busy second"],
                                         training * slowdown["learner tokens per training second"])


def accuracy_curve(summary: dict, grid_s: np.ndarray) -> np.ndarray:
    """Held-out accuracy at the grid's RL seconds, linear between the run's evaluations."""
    points = [(0.0, summary["evaluations"]["after_warmup"]["accuracy"]),
              *((s["rl_s"], s["eval_accuracy"]) for s in summary["steps_records"] if "eval_accuracy" in s),
              (summary["rl_wall_s"], summary["evaluations"]["after_rl"]["accuracy"])]
    seconds, accuracy = zip(*sorted(points))
    return np.interp(grid_s, seconds, accuracy)


def time_to(grid_s: np.ndarray, curve: np.ndarray, target: float) -> float | None:
    """The first RL second at which `curve` reaches `target` (linear between grid points)."""
    above = np.nonzero(curve >= target)[0]
    if not len(above):
        return None
    i = above[0]
    if i == 0:
        return 0.0
    fraction = (target - curve[i - 1]) / (curve[i] - curve[i - 1])
    return float(grid_s[i - 1] + fraction * (grid_s[i] - grid_s[i - 1]))


def plot(path: Path, grid_s: np.ndarray, curves: dict[str, list[np.ndarray]], target: float,
         reached: dict[str, float | None]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for mode, runs in curves.items():
        stacked = np.stack(runs)
        line, = ax.plot(grid_s, stacked.mean(0), label=f"{mode} (mean of {len(runs)})")
        ax.fill_between(grid_s, stacked.min(0), stacked.max(0), color=line.get_color(), alpha=0.15)
        if reached[mode] is not None:
            ax.axvline(reached[mode], color=line.get_color(), linestyle=":")
    ax.axhline(target, color="grey", linestyle="--", label=f"target {target:.1%}")
    ax.set(xlabel="RL seconds (evaluations not counted)", ylabel="held-out greedy accuracy",
           title="time to accuracy (band: range over seeds)")
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--budget-s", type=float, default=60.0)
    parser.add_argument("--eval-every-s", type=float, default=10.0)
    parser.add_argument("--round-tokens", type=int, default=6000,
                        help="C3PO++ round budget (tokens): at most a batch's (B = 256 samples of about 28 tokens), "
                             "or admission control leaves the generator short of prompts while the learner trains")
    parser.add_argument("--eta", type=int, default=1, help="max_staleness of both asynchronous modes")
    parser.add_argument("--eval-prompts", type=int, default=1024)
    parser.add_argument("--warmup-steps", type=int, default=800)
    parser.add_argument("--target", type=float, default=None,
                        help="default: the sync runs' mean final accuracy (their mean curve at the budget)")
    parser.add_argument("--modes", default=",".join(MODES))
    parser.add_argument("--report-only", action="store_true", help="report on the runs already in --out")
    parser.add_argument("--reuse", action="store_true",
                        help="read the runs already finished in --out (their summary.json), run only the others")
    parser.add_argument("--out", default="runs/async_vs_sync", help="the runs and the plot; a warm-up there is reused")
    args, extra = parser.parse_known_args()
    if args.eval_every_s <= 0:  # the time-to-accuracy curves are read on this grid
        parser.error(f"--eval-every-s must be positive, not {args.eval_every_s}")
    out, modes = Path(args.out).absolute(), args.modes.split(",")
    extra = [f"task.eval_prompts={args.eval_prompts}", *extra]
    if not args.report_only and not (out / "warm" / "checkpoints").is_dir():
        run_ringrl(out, "warm", f"learner.warmup_steps={args.warmup_steps}", "run.steps=0", *extra)
    common = [f"run.init_from={out / 'warm'}", f"run.time_budget_s={args.budget_s}",
              f"run.eval_every_s={args.eval_every_s}", "run.steps=100000", *extra]
    runs: dict[str, list[dict]] = {mode: [] for mode in modes}
    for seed in range(args.seeds):
        milestone = 0  # the first mode's trained samples, where the others' accuracy is read
        for mode in modes:
            name = f"{mode}-{seed}"
            finished = args.report_only or (args.reuse and (out / name / "summary.json").is_file())
            summary = read_run(out, name) if finished else run_ringrl(
                out, name, f"run.seed={seed}", *mode_overrides(mode, args.round_tokens, args.eta),
                f"run.eval_at_trained_samples={milestone}", *common)
            runs[mode].append(summary)
            milestone = milestone or summary["actors"]["learner-0"].get("trained_samples", 0)
    report(runs, args, out)


def report(runs: dict[str, list[dict]], args, out: Path) -> None:
    baseline = next(iter(runs))
    milestones = [r["actors"]["learner-0"].get("trained_samples", 0) for r in runs[baseline]]
    table = {mode: [figures(r, m if mode != baseline else 0) for r, m in zip(summaries, milestones)]
             for mode, summaries in runs.items()}
    keys = list(dict.fromkeys(k for rows in table.values() for row in rows for k in row))
    peak = runs[baseline][0]["steps_records"][0]["generator_peak_flops"]
    print(f"{len(milestones)} seeds, {args.budget_s:g} s of RL each; mean (min..max) over seeds; "
          f"the machine's fp32 matmul peak per generator: {peak / 1e9:.1f} GFLOP/s")
    print(f"{'figure':36}" + "".join(f"{mode:>24}" for mode in table)
          + "".join(f"{mode + '/' + baseline:>12}" for mode in table if mode != baseline))
    for key in keys:
        cells = {mode: [row.get(key) for row in rows] for mode, rows in table.items()}
        line = f"{key:36}" + "".join(f"{_spread(values):>24}" for values in cells.values())
        for mode in table:
            if mode != baseline:
                line += f"{_ratio(cells[mode], cells[baseline]):>12}"
        print(line)
    if baseline == "sync":
        bounds = [overlap_bound(r["steps_records"]) for r in runs["sync"]]
        for mode in (m for m in table if m != "sync"):
            ratios = [a["completed samples/s"] / s["completed samples/s"] for a, s in zip(table[mode], table["sync"])]
            efficiency = [ratio / bound for ratio, bound in zip(ratios, bounds)]
            print(f"{mode}: overlap bound from sync's phases {_spread(bounds)}; {mode}/sync completed samples "
                  f"{_spread(ratios)}; efficiency {_spread(efficiency)}")
            if mode == "async":  # C3PO++'s speeds also carry its own costs (resumed rollouts' prefill)
                on_machine = [machine_bound(s["steps_records"], role_speeds(s), role_speeds(a))
                              for s, a in zip(runs["sync"], runs[mode])]
                print(f"async: bound with each role at the speed it had in async {_spread(on_machine)}; "
                      f"efficiency against it {_spread([r / b for r, b in zip(ratios, on_machine)])}")
    if "c3po" in table and "async" in table:
        ratios = [c["completed samples/s"] / a["completed samples/s"] for c, a in zip(table["c3po"], table["async"])]
        print(f"c3po/async completed samples {_spread(ratios)}; c3po's maximum lag "
              f"{_spread([row['max lag'] for row in table['c3po']])} (eta {args.eta} + sigma = algo.max_pauses)")
    grid_s = np.arange(0.0, args.budget_s + args.eval_every_s / 2, args.eval_every_s)
    curves = {mode: [accuracy_curve(r, grid_s) for r in summaries] for mode, summaries in runs.items()}
    # the baseline's mean curve ends at its runs' mean final accuracy (at the budget, not a little after it)
    target = args.target if args.target is not None else float(np.stack(curves[baseline]).mean(0)[-1])
    reached = {mode: time_to(grid_s, np.stack(c).mean(0), target) for mode, c in curves.items()}
    print(f"RL seconds for the mean accuracy curve to reach {target:.1%}: "
          + ", ".join(f"{mode} {_cell(t)}" for mode, t in reached.items())
          + "".join(f"; {mode}/{baseline} {reached[mode] / reached[baseline]:.2f}" for mode in reached
                    if mode != baseline and reached[mode] is not None and reached[baseline]))
    print_ladder(grid_s, curves, baseline, target)
    plot(out / "time_to_accuracy.png", grid_s, curves, target, reached)
    print(f"plot: {out / 'time_to_accuracy.png'}")


def print_ladder(grid_s: np.ndarray, curves: dict[str, list[np.ndarray]], baseline: str, target: float) -> None:
    means = {mode: np.stack(c).mean(0) for mode, c in curves.items()}
    others = [mode for mode in means if mode != baseline]
    print(f"{'accuracy':>10}" + "".join(f"{mode + ' s':>10}" for mode in means)
          + "".join(f"{mode + '/' + baseline:>14}" for mode in others))
    for level, seconds in ladder(grid_s, means, baseline, target):
        print(f"{level:>10.1%}" + "".join(f"{_cell(t):>10}" for t in seconds.values())
              + "".join(f"{_cell_ratio(seconds[mode], seconds[baseline]):>14}" for mode in others))


def ladder(grid_s: np.ndarray, means: dict[str, np.ndarray], baseline: str, target: float) -> list[tuple]:
    """(accuracy, {mode: seconds its mean curve takes to reach it}) at LADDER_RUNGS accuracies from
    halfway between the baseline's start and the target up to the target.

    The default target sits where the curves flatten, so where a mean curve first crosses it moves
    by seconds with a point of evaluation noise; on the steep part below it the ratios are steadier.
    """
    start = means[baseline][0]
    levels = np.linspace(start + (target - start) / 2, target, LADDER_RUNGS)
    return [(float(level), {mode: time_to(grid_s, curve, level) for mode, curve in means.items()})
            for level in levels]


def _spread(values: list) -> str:
    values = [v for v in values if v is not None]
    if not values:
        return "-"
    return f"{mean(values):.4g} ({min(values):.3g}..{max(values):.3g})" if len(values) > 1 else f"{values[0]:.4g}"


def _ratio(values: list, baseline: list) -> str:
    pairs = [(v, b) for v, b in zip(values, baseline) if v is not None and b]
    return f"{mean(v / b for v, b in pairs):.2f}" if pairs else ""


def _cell(value: float | None) -> str:
    return "not reached" if value is None else f"{value:.1f}"


def _cell_ratio(value: float | None, baseline: float | None) -> str:
    return f"{value / baseline:.2f}" if value is not None and baseline else "-"


if __name__ == "__main__":
    main()
