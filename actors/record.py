"""The run directory: metrics.jsonl, TensorBoard event files, a learning-curve PNG, timeline.json,
summary.json and the checkpoint.

One JSON line per RL step (and one per evaluation), written as it happens, so a
run that is stopped still leaves its metrics behind. The same figures go to TensorBoard event
files in the run directory (`tensorboard --logdir runs/`): every number of a step's record at
global step `step` (a dict such as `lag_histogram` as `lag_histogram/<lag>`), each evaluation's
as `evaluation/<name>/<figure>` at the step it follows. The actors' phase spans and the driver's
loop phases make timeline.json (actors/timeline.py), written at the end of the run.
"""
import json
import math
import time
from collections import defaultdict
from contextlib import contextmanager
from dataclasses import asdict
from pathlib import Path

from tensorboardX import SummaryWriter

from actors.timeline import Timeline
from conf.schema import Config

MFU_ROLES = ("generator", "learner")
TENSORBOARD_FLUSH_S = 5  # how stale the event files may be while a run goes on


def make_run_dir(cfg: Config) -> Path:
    name = cfg.run.name or time.strftime("%Y%m%d-%H%M%S")
    run_dir = Path(cfg.run.out_dir).absolute() / name
    run_dir.mkdir(parents=True, exist_ok=True)
    return run_dir


class Recorder:
    def __init__(self, run_dir: Path, cfg: Config):
        self.run_dir = run_dir
        self.metrics = open(run_dir / "metrics.jsonl", "a")
        self.timings: dict[str, float] = defaultdict(float)
        self.steps: list[dict] = []
        self.evaluations: dict[str, dict] = {}
        self.summary: dict = {"status": "running", "config": asdict(cfg)}
        self.round_token_budget = cfg.algo.round_token_budget
        self.rl_start: dict | None = None  # the pool's totals when RL (re)started: MFU counts from there
        self.rates_since: dict | None = None  # the record the next step's rates are counted from
        self.timeline = Timeline()
        self.tensorboard: SummaryWriter | None = None  # opened at the first figure (after a resume's purge)
        self.purge_step: int | None = None
        (run_dir / "config.json").write_text(json.dumps(asdict(cfg), indent=2))

    @contextmanager
    def timer(self, phase: str):
        """Time one phase of the loop; the figure lands in the next step record, the span in the timeline."""
        start, wall_start = time.perf_counter(), time.time()
        try:
            yield
        finally:
            elapsed = time.perf_counter() - start
            self.timings[f"time/{phase}_s"] += elapsed
            self.timeline.span("driver", "loop", phase, wall_start, wall_start + elapsed)

    def take_spans(self, stats: dict[str, dict | None]) -> dict[str, dict | None]:
        """Move the phase spans out of the actors' stats (by actor name) into the timeline; returns the
        stats without them."""
        for name, actor_stats in stats.items():
            if actor_stats and "spans" in actor_stats:
                self.timeline.add(name, actor_stats["spans"])
        return {name: {k: v for k, v in s.items() if k != "spans"} if s else s for name, s in stats.items()}

    def processes(self, where: dict[str, dict]) -> None:
        """actors.json: the process id and node address of every live actor by name (to find one, or
        kill one in a fault drill)."""
        (self.run_dir / "actors.json").write_text(json.dumps(where, indent=1))

    def resume(self, step: int) -> None:
        """Continue a run from its checkpoint after `step` steps: metrics of later steps (from the
        timeline that was lost) are dropped, the earlier ones and the warm-up evaluation kept."""
        path = self.run_dir / "metrics.jsonl"
        records = [json.loads(line) for line in path.read_text().splitlines()]
        kept = [r for r in records if r.get("step", math.inf) < step or r.get("evaluation") == "after_warmup"]
        self.metrics.close()
        path.write_text("".join(json.dumps(r) + "\n" for r in kept))
        self.metrics = open(path, "a")
        self.steps = [r for r in kept if "step" in r]
        self.evaluations = {r["evaluation"]: r for r in kept if "evaluation" in r}
        self.purge_step = step  # TensorBoard hides the lost steps' figures too
        earlier = self.run_dir / "timeline.json"
        if earlier.exists():
            earlier.rename(self.run_dir / f"timeline-before-resume-at-step-{step:06d}.json")

    def start_rl(self, totals: dict) -> None:
        """The pool's totals (pool_totals in run.py) as RL starts: the first step's rates count from here."""
        self.rl_start = self.rates_since = {**totals, "rl_s": 0.0}

    def step(self, record: dict) -> dict:
        """Write one RL step's record, with the rates since the previous step (or RL's start); returns it.

        Rates count seconds of RL (`rl_s`, the run's clock without evaluations), not wall time.
        """
        record = {**record, **self.timings, "wall": time.time()}
        self.timings.clear()
        previous, self.rates_since = self.rates_since, record
        if previous is not None:
            elapsed = record["rl_s"] - previous["rl_s"]
            new_tokens = record["generated_tokens"] - previous["generated_tokens"]
            record["generated_tokens_per_s"] = new_tokens / elapsed
            record["trained_tokens_per_s"] = record.get("trained_tokens", 0) / elapsed
            record.update(mfu(previous, record, elapsed))
            record.update(phase_shares(previous, record))
            if self.round_token_budget:
                record["round_budget_utilisation"] = new_tokens / self.round_token_budget
        self.steps.append(record)
        self._write(record)
        self._to_tensorboard("", record, record["step"])
        return record

    def evaluation(self, name: str, result: dict) -> dict:
        self.evaluations[name] = result
        record = {"evaluation": name, **result, "wall": time.time()}
        self._write(record)
        self._to_tensorboard(f"evaluation/{name}/", record, self.steps[-1]["step"] + 1 if self.steps else 0)
        return result

    def _write(self, record: dict) -> None:
        self.metrics.write(json.dumps(record) + "\n")
        self.metrics.flush()

    def _to_tensorboard(self, prefix: str, record: dict, step: int) -> None:
        """Every number of `record` as a scalar at global step `step`, stamped with the record's wall time."""
        if self.tensorboard is None:
            resumed = "" if self.purge_step is None else f".from-step-{self.purge_step}"  # a file name of its own
            self.tensorboard = SummaryWriter(str(self.run_dir), purge_step=self.purge_step,
                                             flush_secs=TENSORBOARD_FLUSH_S, filename_suffix=resumed)
        for tag, value in _scalars(record, prefix):
            self.tensorboard.add_scalar(tag, value, step, walltime=record["wall"])

    def plot(self) -> None:
        if not self.steps:
            return
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        self._plot_learning_curve(plt)
        self._plot_staleness(plt)

    def _plot_staleness(self, plt) -> None:
        """Share of trained tokens per policy lag, and IcePop's masked fraction per lag, by step."""
        lags = sorted({int(lag) for r in self.steps for lag in r.get("lag_histogram", {})})
        if not lags:
            return
        fig, (share_ax, masked_ax) = plt.subplots(1, 2, figsize=(11, 4))
        steps = [r["step"] for r in self.steps]
        for lag in lags:
            histograms = [r.get("lag_histogram", {}) for r in self.steps]
            shares = [h.get(lag, 0) / max(1, sum(h.values())) for h in histograms]
            share_ax.plot(steps, shares, label=f"lag {lag}")
            masked_ax.plot(steps, [r.get(f"lag/{lag}/masked_frac", float("nan")) for r in self.steps],
                           label=f"lag {lag}")
        share_ax.set(xlabel="RL step", ylabel="share of trained tokens", title="policy lag")
        masked_ax.set(xlabel="RL step", ylabel="fraction masked by IcePop", title="masked by lag")
        share_ax.legend(fontsize=8)
        masked_ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(self.run_dir / "staleness.png", dpi=100)
        plt.close(fig)

    def _plot_learning_curve(self, plt) -> None:
        fig, ax = plt.subplots(figsize=(7, 4))
        steps = [r["step"] for r in self.steps]
        ax.plot(steps, [r["reward"] for r in self.steps], alpha=0.4, label="train reward (sampled)")
        ax.plot(steps, _moving_average([r["reward"] for r in self.steps], 10), label="train reward, 10-step mean")
        for name, x in (("after_warmup", 0), ("after_rl", steps[-1] + 1)):
            if name in self.evaluations:
                ax.scatter([x], [self.evaluations[name]["accuracy"]], marker="*", s=150, zorder=3,
                           label=f"held-out greedy accuracy ({name.replace('_', ' ')})")
        for step, acc in ((r["step"], r["eval_accuracy"]) for r in self.steps if "eval_accuracy" in r):
            ax.scatter([step], [acc], color="black", marker=".", zorder=3)
        ax.set(xlabel="RL step", ylabel="reward / accuracy", ylim=(0, 1), title=self.run_dir.name)
        ax.legend(loc="lower right", fontsize=8)
        fig.tight_layout()
        fig.savefig(self.run_dir / "learning_curve.png", dpi=100)
        plt.close(fig)

    def finish(self, status: str, extra: dict) -> Path:
        self.summary.update(status=status, steps=len(self.steps), evaluations=self.evaluations, **extra)
        if self.rl_start is not None and self.rates_since is not self.rl_start:  # at least one step since
            last = self.rates_since
            self.summary["mfu"] = mfu(self.rl_start, last, last["rl_s"])
        before = self.evaluations.get("after_warmup", {}).get("accuracy")
        after = self.evaluations.get("after_rl", {}).get("accuracy")
        if before is not None and after is not None:
            self.summary["accuracy_gain"] = after - before
        self.plot()
        self.timeline.write(self.run_dir / "timeline.json")
        path = self.run_dir / "summary.json"
        path.write_text(json.dumps(self.summary, indent=2, default=str))
        self.metrics.close()
        if self.tensorboard is not None:
            self.tensorboard.close()
        return path


def mfu(before: dict, after: dict, seconds: float) -> dict:
    """Model FLOPs utilisation between two step records: per role (its FLOPs over the peak of the
    cores it holds) and for the run (all FLOPs over all those cores' peak)."""
    done = {role: after[f"{role}_flops"] - before[f"{role}_flops"] for role in MFU_ROLES}
    peaks = {role: after[f"{role}_peak_flops"] for role in MFU_ROLES}
    figures = {f"mfu/{role}": done[role] / (seconds * peaks[role]) for role in MFU_ROLES if peaks[role]}
    if sum(peaks.values()):
        figures["mfu/run"] = sum(done.values()) / (seconds * sum(peaks.values()))
    return figures


def phase_shares(before: dict, after: dict) -> dict:
    """Each role's share of time per phase between two step records, from the summed phase seconds
    (`phases/<role>/<phase>`, `phases/<role>/wall` summed over the role's actors)."""
    shares = {}
    for key, seconds in after.items():
        if key.startswith("phases/") and not key.endswith("/wall"):
            wall_key = key.rsplit("/", 1)[0] + "/wall"
            wall = after[wall_key] - before.get(wall_key, 0.0)
            if wall > 0:
                shares[f"share/{key.removeprefix('phases/')}"] = (seconds - before.get(key, 0.0)) / wall
    return shares


def _scalars(record: dict, prefix: str) -> list[tuple[str, float]]:
    """(tag, value) for every number in `record` but its step and wall time; a dict's numbers as `key/<k>`."""
    scalars = []
    for key, value in record.items():
        if key in ("step", "wall"):
            continue
        if isinstance(value, dict):
            scalars += [(f"{prefix}{key}/{k}", v) for k, v in value.items() if _is_number(v)]
        elif _is_number(value):
            scalars.append((f"{prefix}{key}", value))
    return scalars


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _moving_average(values: list[float], window: int) -> list[float]:
    out, total = [], 0.0
    for i, v in enumerate(values):
        total += v
        if i >= window:
            total -= values[i - window]
        out.append(total / min(i + 1, window))
    return out
