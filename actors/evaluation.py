"""Evaluation of a checkpoint (`python run.py run.mode=eval run.init_from=<run dir>`), no training.

The same actors as a training run start; the learners load the policy of the run's newest
complete checkpoint and publish it to the generators, which then decode the held-out prompts:
once greedily (the accuracy a training run records, by the same generator call) and `eval.k`
times at `eval.temperature` (pass@k). The figures land in a run directory of the evaluation's
own, so the evaluated run's files stay as they were:

  eval.json           greedy accuracy, pass@j for j = 1, 2, 4, ... and k, the checkpoint and version
  eval_prompts.jsonl  one line per held-out prompt: its greedy and sampled completions and rewards

pass@k is the unbiased estimator over the k samples of each prompt (Chen et al. 2021, "Evaluating
Large Language Models Trained on Code"), averaged over the prompts; a sample counts as correct
when the task gives it reward 1. The evaluation takes the evaluated run's own overrides (its model,
task, pool of actors), without its run.* and ray.* settings; later ones on the command line win.
"""
import json
import math
import time
from dataclasses import asdict
from pathlib import Path

from actors.system import (System, accuracy, async_on_learners, async_sample, async_sync_weights, call,
                           evaluate_in_slices)
from actors.tasks import build_task
from conf.load import ConfigError
from conf.schema import Config
from learner.checkpoint import latest_valid

EVAL_FILE = "eval.json"
PER_PROMPT_FILE = "eval_prompts.jsonl"
NOT_INHERITED = ("run.", "ray.")  # where and how the evaluation itself runs


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k of one prompt with `c` correct among `n` samples: 1 - C(n-c, k) / C(n, k),
    computed as 1 - prod_{i=n-c+1..n} (1 - k/i) (no large binomials)."""
    if not (0 <= c <= n and 1 <= k <= n):
        raise ValueError(f"pass@k needs 0 <= c ({c}) <= n ({n}) and 1 <= k ({k}) <= n")
    if n - c < k:
        return 1.0  # every k-subset holds a correct sample
    return 1.0 - math.prod(1.0 - k / i for i in range(n - c + 1, n + 1))


def pass_at_k_points(n: int) -> list[int]:
    """The k reported from n samples: powers of two below n, and n."""
    return [2**i for i in range(n.bit_length()) if 2**i < n] + [n]


def pass_at_k_figures(correct: list[int], n: int) -> dict[str, float]:
    """{"pass@k": mean over prompts} for each reported k, from each prompt's correct count."""
    return {f"pass@{k}": sum(pass_at_k(n, c, k) for c in correct) / len(correct) for k in pass_at_k_points(n)}


def with_evaluated_run_overrides(argv: list[str], overrides_file: str) -> list[str]:
    """With `run.mode=eval`: the overrides of the run `run.init_from` names (`overrides_file` in its
    directory), without its run.* and ray.* ones, then `argv` (later ones win)."""
    if _last_value(argv, "run.mode") != "eval" or not _last_value(argv, "run.init_from"):
        return argv  # validation names a missing run.init_from
    saved = Path(_last_value(argv, "run.init_from")) / overrides_file
    if not saved.is_file():
        raise ConfigError(f"run.init_from: {saved} not found (not a ringrl run directory)")
    inherited = [arg for arg in json.loads(saved.read_text()) if not arg.lstrip("+~").startswith(NOT_INHERITED)]
    return [*inherited, *argv]


def _last_value(argv: list[str], key: str) -> str:
    values = [arg.split("=", 1)[1] for arg in argv if arg.startswith(f"{key}=")]
    return values[-1] if values else ""


def evaluate_checkpoint(cfg: Config, system: System, run_dir: Path, log) -> dict:
    """Load the newest complete checkpoint of `run.init_from`, publish it, evaluate it; write the files."""
    checkpoint = latest_valid(Path(cfg.run.init_from), log.warning)
    call(async_on_learners(system, "load", str(checkpoint), True))
    version = call(async_sync_weights(system))["learner-0"]["version"]
    log.info("evaluating {} (policy version {})", checkpoint, version)
    task = build_task(cfg.task)
    prompts = [vars(p) for p in task.eval_prompts()]
    start = time.perf_counter()
    greedy_results = evaluate_in_slices(system, prompts)
    greedy_s, start = time.perf_counter() - start, time.perf_counter()
    sampled = [s for shard in call(async_sample(system, prompts, cfg.eval.k, cfg.eval.temperature)).values()
               for s in shard]
    sampling_s = time.perf_counter() - start
    greedy = {g["uid"]: g for r in greedy_results.values() for g in r["per_prompt"]}
    samples = {s["uid"]: s for s in sampled}
    lines = [per_prompt(task, p, greedy[p["uid"]], samples[p["uid"]]) for p in prompts]
    result = {"checkpoint": str(checkpoint), "version": version, "prompts": len(prompts),
              "greedy_accuracy": accuracy(greedy_results)["accuracy"], "k": cfg.eval.k,
              "temperature": cfg.eval.temperature, "seed": cfg.run.seed,
              **pass_at_k_figures([line["correct"] for line in lines], cfg.eval.k),
              "greedy_s": greedy_s, "sampling_s": sampling_s}
    write_files(cfg, run_dir, result, lines)
    figures = ", ".join(f"{key} {value:.1%}" for key, value in result.items() if key.startswith("pass@"))
    log.info("greedy accuracy {:.1%}; {} ({} samples at temperature {:g}); {}", result["greedy_accuracy"], figures,
             cfg.eval.k, cfg.eval.temperature, run_dir / EVAL_FILE)
    return result


def per_prompt(task, prompt: dict, greedy: dict, sampled: dict) -> dict:
    """One line of eval_prompts.jsonl."""
    return {"uid": prompt["uid"], "prompt": task.tokenizer.decode(prompt["tokens"]), "meta": prompt["meta"],
            "greedy": greedy["completion"], "greedy_reward": greedy["reward"],
            "correct": sum(reward == 1.0 for reward in sampled["rewards"]), "samples": len(sampled["rewards"]),
            "sample_completions": sampled["completions"], "sample_rewards": sampled["rewards"]}


def write_files(cfg: Config, run_dir: Path, result: dict, lines: list[dict]) -> None:
    (run_dir / "config.json").write_text(json.dumps(asdict(cfg), indent=2))
    (run_dir / PER_PROMPT_FILE).write_text("".join(json.dumps(line) + "\n" for line in lines))
    (run_dir / EVAL_FILE).write_text(json.dumps(result, indent=2))
