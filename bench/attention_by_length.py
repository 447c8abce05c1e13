"""The learner's RL step with attention over rows of about one length at a time (model.moe.LENGTH_BLOCK)
against all of a packed batch's rows padded to the longest one, side by side in one process.

Long-tail batches (carry_add_longtail, the model and lengths of bench/async_vs_sync.py) of
`--batch` samples: 64 is a streamed micro-batch of 8 groups, 256 a whole batch. The two layouts
take turns, one untimed step before each timed one, `--repeats` times; it prints the median
seconds of each and their ratio (by length / padded). The padded layout is the one attention had
before: `model.moe._row_groups` made to give none.

    python bench/attention_by_length.py [--batch 64 256] [--repeats 12]
"""
import argparse
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import model.moe as moe  # noqa: E402
from actors.tasks import build_task  # noqa: E402
from bench.async_vs_sync import TASK  # noqa: E402
from bench.mfu import learner_item, longtail_samples  # noqa: E402
from conf.load import load_config  # noqa: E402

LAYOUTS = {"by length": moe._row_groups, "padded": lambda lengths_B: None}


def timed_steps(batch: int, repeats: int) -> dict[str, list[float]]:
    cfg = load_config(TASK)
    model = moe.MoECausalLM(cfg.model)
    item = learner_item(model, cfg, longtail_samples(build_task(cfg.task), batch, cfg.model.max_seq_len), repeats)
    seconds = {name: [] for name in LAYOUTS}
    try:
        for _ in range(repeats):
            for name, row_groups in LAYOUTS.items():
                moe._row_groups = row_groups
                item.run()
                start = time.perf_counter()
                item.run()
                seconds[name].append(time.perf_counter() - start)
    finally:
        moe._row_groups = LAYOUTS["by length"]
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--batch", type=int, nargs="+", default=[64, 256])
    parser.add_argument("--repeats", type=int, default=12)
    args = parser.parse_args()
    torch.set_num_threads(1)
    print(f"torch {torch.__version__}, 1 thread; median seconds of one RL step over {args.repeats} turns")
    for batch in args.batch:
        medians = {name: statistics.median(s) for name, s in timed_steps(batch, args.repeats).items()}
        print(f"{batch:4} samples: by length {medians['by length']:.4f} s, padded {medians['padded']:.4f} s, "
              f"by length / padded {medians['by length'] / medians['padded']:.2f}")


if __name__ == "__main__":
    main()
