"""The GPU figures of ringrl in one command (at most about 8 minutes on one H200 with 16 cores).

Prints, side by side:
  1. `python run.py` with defaults: accuracy after warm-up and after RL, wall time, the device of
     every actor and the weight path the run chose;
  2. the engine's generated tokens/s on the GPU and on the CPU, `model=small`, 8/64/256 slots;
  3. async vs sync on `carry_add_longtail` with the GPU engine (bench/async_vs_sync.py);
  4. weight-sync seconds per GiB on the path the default run chose (its per-step syncs);
  5. the result of `pytest -m gpu`.
On a machine without CUDA every GPU row is skipped with its reason; the CPU engine rates run.

Usage: python bench/gpu.py [--out DIR] [--budget-s 45] [--warmup-steps 400] [--decode-steps 20]
"""
import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from conf.load import load_config  # noqa: E402
from comm.placement import Placement, cast_parameters, compute_dtype  # noqa: E402
from model.engine import GenerationEngine  # noqa: E402
from model.moe import MoECausalLM  # noqa: E402

SLOTS = (8, 64, 256)
NO_GPU = "skipped: no CUDA device here (torch.cuda.device_count() == 0)"
RUN_FLAGS = ["ray.dashboard=false", "run.progress=false"]


def default_run(out: Path) -> dict:
    """`python run.py` with its defaults (dashboard off: the GPU machine's Ray has none)."""
    start = time.monotonic()
    subprocess.run([sys.executable, "run.py", f"run.out_dir={out}", "run.name=default", *RUN_FLAGS], cwd=REPO,
                   check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wall = time.monotonic() - start
    summary = json.loads((out / "default" / "summary.json").read_text())
    steps = [json.loads(line) for line in (out / "default" / "metrics.jsonl").read_text().splitlines()]
    synced = [s for s in steps if s.get("weight_sync_bytes")]
    evaluations = summary["evaluations"]
    return {"after warm-up": evaluations["after_warmup"]["accuracy"], "after RL": evaluations["after_rl"]["accuracy"],
            "wall s": wall, "devices": {name: actor.get("device") for name, actor in summary["actors"].items()},
            "weight path": summary["weight_path"],
            "sync s/GiB": sum(s["weight_sync_s"] for s in synced) / sum(s["weight_sync_bytes"] for s in synced) * 2**30}


def engine_tokens_per_s(device: str, slots: int, decode_steps: int) -> float:
    """Decode tokens/s of the `model=small` engine with every slot running (no Ray)."""
    cfg = load_config(["model=small"])
    placement = Placement("here", device, "0" if device == "cuda" else "")
    torch.manual_seed(0)
    model = cast_parameters(MoECausalLM(cfg.model), compute_dtype(placement)).to(device)
    engine = GenerationEngine(model, slots, cfg.model.max_seq_len, eos_id=-1, pad_id=0,
                              max_new_tokens=cfg.model.max_seq_len - 8, temperature=1.0)
    for slot in range(slots):
        engine.add(str(slot), [1, 3 + slot % 9, 4, 5 + slot % 7, 6])
    engine.step()  # the prefill
    steps = min(decode_steps, cfg.model.max_seq_len - 16)
    _synchronize(device)
    start = time.perf_counter()
    for _ in range(steps):
        engine.step()
    _synchronize(device)
    return slots * steps / (time.perf_counter() - start)


def _synchronize(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def async_vs_sync(out: Path, budget_s: float, warmup_steps: int) -> str:
    result = subprocess.run([sys.executable, "bench/async_vs_sync.py", f"--budget-s={budget_s}", "--round-tokens=0",
                             f"--warmup-steps={warmup_steps}", f"--out={out / 'async_vs_sync'}"],
                            cwd=REPO, check=True, capture_output=True, text=True)
    return result.stdout.strip()


def gpu_tests() -> str:
    result = subprocess.run([sys.executable, "-m", "pytest", "-q", "-m", "gpu", "tests"], cwd=REPO,
                            capture_output=True, text=True)
    lines = [line for line in result.stdout.splitlines() if line.strip()]
    return f"exit {result.returncode}: {lines[-1] if lines else result.stderr.strip()[-200:]}"


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default="", help="keep the runs here")
    parser.add_argument("--budget-s", type=float, default=45.0, help="async and sync RL wall time each")
    parser.add_argument("--warmup-steps", type=int, default=400, help="warm-up of the async/sync comparison")
    parser.add_argument("--decode-steps", type=int, default=20)
    args = parser.parse_args()
    has_gpu = torch.cuda.device_count() > 0
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(args.out or tmp)
        print("1. python run.py (defaults)")
        if has_gpu:
            run = default_run(out)
            print(f"   accuracy after warm-up {run['after warm-up']:.1%}, after RL {run['after RL']:.1%}, "
                  f"wall {run['wall s']:.0f} s")
            print(f"   devices: {run['devices']}; weight path: {run['weight path']}")
        else:
            print(f"   {NO_GPU}")
        print("2. engine generated tokens/s, model=small")
        print(f"   {'slots':>6} {'GPU':>12} {'CPU':>12} {'GPU/CPU':>8}")
        for slots in SLOTS:
            cpu = engine_tokens_per_s("cpu", slots, args.decode_steps)
            if has_gpu:
                gpu = engine_tokens_per_s("cuda", slots, args.decode_steps)
                print(f"   {slots:6d} {gpu:12.0f} {cpu:12.0f} {gpu / cpu:8.1f}")
            else:
                print(f"   {slots:6d} {'-':>12} {cpu:12.0f} {'-':>8}  (GPU {NO_GPU})")
        print("3. async vs sync, carry_add_longtail, GPU engine")
        print("   " + async_vs_sync(out, args.budget_s, args.warmup_steps).replace("\n", "\n   ") if has_gpu
              else f"   {NO_GPU}")
        print("4. weight sync")
        print(f"   {run['sync s/GiB']:.3f} s/GiB over {run['weight path']}" if has_gpu else f"   {NO_GPU}")
        print("5. pytest -m gpu")
        print(f"   {gpu_tests()}" if has_gpu else f"   {NO_GPU}")


if __name__ == "__main__":
    main()
