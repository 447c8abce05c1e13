"""Model FLOPs utilisation of the generation engine and the learner, and where their time goes.

For each model preset, in this process (no Ray), on `--threads` torch threads:
  prefill      the engine's first step over `--prefill-slots` new prompts;
  decode@S     one engine decode step over S running sequences (tokens at context ~ --context);
  learner      one `Trainer.rl_step` on `--batch` long-tail samples (carry_add_longtail lengths).
MFU = useful model FLOPs (model/flops.py) / (median seconds * the measured fp32 matmul peak).
Each item is timed unprofiled, then run again under torch.profiler; the shares split that
profiled wall time by the `ringrl::` ranges the model marks (backward ops count toward the
range of the forward op they differentiate), "other ops" is every op outside them (norms,
embedding, LM head, loss, optimizer) and "python" is wall time in no op at all.

    python bench/mfu.py [--presets tiny small] [--threads 1] [--slots 8 64 256] [--no-profile]
"""
import argparse
import os
import re
import random
import statistics
import sys
import time
from collections import Counter

import numpy as np
import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from comm.wire import Trajectory  # noqa: E402
from conf.load import load_config  # noqa: E402
from learner.batch import collate  # noqa: E402
from learner.trainer import Trainer  # noqa: E402
from model.engine import GenerationEngine  # noqa: E402
from model.flops import forward_flops, matmul_peak_flops, sequence_forward_flops, training_flops  # noqa: E402
from model.moe import MoECausalLM  # noqa: E402
from actors.tasks import build_task  # noqa: E402

CATEGORIES = ("attention", "router", "expert_dispatch", "expert_matmuls", "dense_ffn", "sampling",
              "other ops", "python")
LABEL_PREFIX = "ringrl::"
BACKWARD_NODE = re.compile(r"Backward\d*$")


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--presets", nargs="+", default=["tiny", "small"], help="conf/model presets")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    parser.add_argument("--slots", type=int, nargs="+", default=[8, 64, 256], help="running sequences to decode")
    parser.add_argument("--prefill-slots", type=int, default=256, help="new prompts prefilled together")
    parser.add_argument("--context", type=int, default=32, help="decode: keys per sequence at the timed steps "
                                                                "(capped by the preset's max_seq_len)")
    parser.add_argument("--steps", type=int, default=8, help="decode steps timed")
    parser.add_argument("--batch", type=int, default=256, help="learner: sequences per RL step")
    parser.add_argument("--repeats", type=int, default=3, help="timed repeats of prefill")
    parser.add_argument("--learner-repeats", type=int, default=2, help="timed repeats of the learner step")
    parser.add_argument("--no-profile", action="store_true", help="skip the profiled runs (MFU only)")
    return parser.parse_args(argv)


def longtail_samples(task, count: int, max_len: int, seed: int = 0) -> list[tuple[list[int], list[int]]]:
    """(prompt, completion) pairs of carry_add_longtail: completions of 5 to 55 tokens, cut to fit max_len."""
    rng = random.Random(seed)
    samples = [task.demonstration(rng) for _ in range(count)]
    return [(prompt, completion[: max_len - len(prompt)]) for prompt, completion in samples]


def scored_groups(samples, group_size: int, seed: int = 0) -> list[list[Trajectory]]:
    """GRPO groups of trajectories with made-up behaviour log-probs and unequal rewards."""
    rng = np.random.default_rng(seed)
    trajectories = [Trajectory(
        uid=f"s{i}", prompt_uid=f"p{i // group_size}", group=i % group_size,
        prompt_tokens=np.array(prompt, dtype=np.int32), completion_tokens=np.array(completion, dtype=np.int32),
        behavior_logprobs=-rng.uniform(0.01, 1.0, len(completion)).astype(np.float32),
        policy_version=np.zeros(len(completion), dtype=np.int32), finish_reason="stop",
        reward=float(i % 2)) for i, (prompt, completion) in enumerate(samples)]
    return [trajectories[i : i + group_size] for i in range(0, len(trajectories), group_size)]


class Item:
    """One benchmarked piece of work: `run()` does it once and returns its useful FLOPs."""

    def __init__(self, name: str, run, repeats: int, profiled: int):
        self.name, self.run, self.repeats, self.profiled = name, run, repeats, profiled

    def measure(self) -> tuple[float, float]:
        """(median seconds, FLOPs) over the repeats, after one untimed run."""
        self.run()
        seconds, flops = [], 0.0
        for _ in range(self.repeats):
            start = time.perf_counter()
            flops = self.run()
            seconds.append(time.perf_counter() - start)
        return statistics.median(seconds), flops


def prefill_item(model, tok, prompts: list[list[int]], repeats: int) -> Item:
    engine = GenerationEngine(model, len(prompts), model.cfg.max_seq_len, eos_id=-1, pad_id=tok.pad_id,
                              max_new_tokens=1, temperature=1.0)

    def run() -> float:
        engine.pause_all()
        for i, prompt in enumerate(prompts):
            engine.add(f"p{i}", prompt)
        engine.step()
        return sequence_forward_flops(model.cfg, [len(p) for p in prompts])

    return Item(f"prefill {len(prompts)}x{statistics.mean(map(len, prompts)):.0f}", run, repeats, profiled=2)


def decode_item(model, tok, prompts: list[list[int]], context: int, steps: int) -> Item:
    """One decode step over len(prompts) sequences, which start (untimed) from their prompts
    advanced to about `context` keys and restart there when the room for timed steps runs out."""
    max_len = model.cfg.max_seq_len
    engine = GenerationEngine(model, len(prompts), max_len, eos_id=-1, pad_id=tok.pad_id,
                              max_new_tokens=max_len - max(map(len, prompts)), temperature=1.0)
    longest_start = engine.max_new_tokens - 2 * steps - 1  # room for the timed and the profiled steps
    start_tokens = max(1, min(context - statistics.mean(map(len, prompts)), longest_start))

    def restart() -> None:
        engine.pause_all()
        for i, prompt in enumerate(prompts):
            engine.add(f"p{i}", prompt)
        for _ in range(int(start_tokens)):
            engine.step()

    def run() -> float:
        if len(engine.active[0].completion_tokens) >= start_tokens + 2 * steps:
            restart()
        keys = sum(len(r.prompt_tokens) + len(r.completion_tokens) for r in engine.active)
        engine.step()
        return forward_flops(model.cfg, len(prompts), keys)

    restart()
    return Item(f"decode@{len(prompts)}", run, steps, profiled=steps - 1)


def learner_item(model, cfg, samples, repeats: int) -> Item:
    """One RL step (forward, IcePop loss, backward, optimizer) on a long-tail batch."""
    trainer = Trainer(model, cfg.learner, cfg.algo, cfg.generator.temperature)
    batch = collate(scored_groups(samples, cfg.algo.group_size), pad_id=0)
    lengths = [len(p) + len(c) - 1 for p, c in samples]
    mean_len, longest = statistics.mean(lengths), max(lengths)

    def run() -> float:
        trainer.rl_step(batch)
        return training_flops(cfg.model, lengths)

    return Item(f"learner {len(samples)} seqs (len {mean_len:.0f}/{longest})", run, repeats, profiled=1)


def profile_shares(item: Item) -> dict[str, float]:
    """Shares of the profiled wall time of `item.run` (`item.profiled` calls) by category."""
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        start = time.perf_counter()
        for _ in range(item.profiled):
            item.run()
        wall_us = (time.perf_counter() - start) * 1e6
    events = prof.events()
    by_sequence = {e.sequence_nr: _label(e) for e in events if e.sequence_nr >= 0 and not _is_backward(e)}
    seconds = Counter()
    for e in events:
        category = _category(e, by_sequence)
        seconds[category] += e.self_cpu_time_total
    seconds["python"] += wall_us - sum(seconds.values())
    return {c: seconds[c] / wall_us for c in CATEGORIES}


def _is_backward(event) -> bool:
    """An autograd node's range (`MmBackward0`, or the engine's `evaluate_function: MmBackward0`)."""
    return event.name.startswith("autograd::engine::evaluate_function") or BACKWARD_NODE.search(event.name)


def _label(event) -> str:
    """The innermost `ringrl::` range around an event, or "other ops"."""
    while event is not None:
        if event.name.startswith(LABEL_PREFIX):
            return event.name[len(LABEL_PREFIX):]
        event = event.cpu_parent
    return "other ops"


def _category(event, label_of_sequence: dict) -> str:
    if event.name.startswith(LABEL_PREFIX):
        return "python"  # a range's own time: the interpreter between its ops
    node = event
    while node is not None and not _is_backward(node):
        node = node.cpu_parent
    if node is not None:  # a backward op: the range of the forward op it differentiates
        return label_of_sequence.get(node.sequence_nr, "other ops")
    return _label(event)


def bench_preset(preset: str, args) -> list[tuple[str, float, float, dict]]:
    """(name, seconds, MFU, shares) of every item for one model preset."""
    cfg = load_config([f"model={preset}", "task.name=carry_add_longtail"])
    task = build_task(cfg.task)
    torch.manual_seed(0)
    model = MoECausalLM(cfg.model)
    peak = matmul_peak_flops(cfg.model.hidden_size, args.threads)
    print(f"\n{preset}: {model.count_parameters() / 1e6:.1f}M parameters, max_seq_len {cfg.model.max_seq_len}, "
          f"fp32 matmul peak {peak / 1e9:.1f} GFLOP/s on {args.threads} thread(s)", flush=True)
    print_header()
    samples = longtail_samples(task, max(args.batch, args.prefill_slots, *args.slots), cfg.model.max_seq_len)
    prompts = [p for p, _ in samples]
    items = [prefill_item(model.eval(), task.tokenizer, prompts[: args.prefill_slots], args.repeats)]
    items += [decode_item(model.eval(), task.tokenizer, prompts[:slots], args.context, args.steps)
              for slots in args.slots]
    items.append(learner_item(model, cfg, samples[: args.batch], args.learner_repeats))
    rows = []
    for item in items:
        seconds, flops = item.measure()
        shares = {} if args.no_profile else profile_shares(item)
        rows.append((item.name, seconds, flops / (seconds * peak), shares))
        print_row(*rows[-1])
    return rows


def print_header() -> None:
    names = "".join(f"{c[:10]:>11}" for c in CATEGORIES)
    print(f"{'item':<30}{'seconds':>9}{'MFU':>7}{names}")


def print_row(name: str, seconds: float, mfu: float, shares: dict) -> None:
    cells = "".join(f"{shares[c]:>11.1%}" if shares else f"{'-':>11}" for c in CATEGORIES)
    print(f"{name:<30}{seconds:>9.4f}{mfu:>7.3f}{cells}", flush=True)


def main(argv: list[str]) -> None:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {args.threads} thread(s); seconds: median per item; shares of the "
          "profiled wall time")
    results = {preset: bench_preset(preset, args) for preset in args.presets}
    print("\nsummary")
    for preset, rows in results.items():
        print(f"{preset}")
        print_header()
        for row in rows:
            print_row(*row)


if __name__ == "__main__":
    main(sys.argv[1:])
