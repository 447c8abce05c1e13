"""Load the config: schema dataclasses + Hydra YAML + command-line overrides, checked once.

`load_config(overrides)` returns a `Config` or raises `ConfigError` whose message
is one line naming the field and the numbers involved.
"""
import math
import os

from hydra import compose, initialize_config_dir
from hydra.core.config_store import ConfigStore
from hydra.core.global_hydra import GlobalHydra
from omegaconf import OmegaConf

from comm.addresses import HOST_POLICIES, resolve_policy, valid_host
from comm.placement import DEVICE_SETTINGS
from conf.schema import Config

CONF_DIR = os.path.dirname(os.path.abspath(__file__))
AGGREGATIONS = ("seq_mean", "token_mean", "token_budget")
AUTO_GPUS = -1.0
PLACEMENTS = ("pack", "spread")
GPU_ROLES = ("learner", "generator")
FAILURE_POLICIES = ("restart", "continue", "stop")
RUN_MODES = ("train", "plan", "eval")


class ConfigError(ValueError):
    pass


def load_config(overrides: list[str]) -> Config:
    ConfigStore.instance().store(name="schema", node=Config)
    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=CONF_DIR, version_base=None):
            composed = compose(config_name="config", overrides=overrides)
        cfg: Config = OmegaConf.to_object(composed)
    except Exception as err:  # Hydra and OmegaConf raise several types; all mean a bad override
        raise ConfigError(_first_line(err)) from None
    resolve(cfg)
    validate(cfg)
    return cfg


def _first_line(err: BaseException) -> str:
    """The error's first line, followed by its cause's (Hydra puts the field name there)."""
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    message = lines[0] if lines else type(err).__name__
    if err.__cause__ is not None:
        message = f"{message} {_first_line(err.__cause__)}"
    return message


def resolve(cfg: Config) -> None:
    """Fill values that follow from others (the vocabulary from the task's tokenizer)."""
    from actors.tasks import build_task

    if cfg.task.dataset:  # actors may run in another working directory (Ray's working_dir)
        cfg.task.dataset = os.path.abspath(cfg.task.dataset)
    try:
        task = build_task(cfg.task)
    except ValueError as err:
        raise ConfigError(str(err)) from None
    if cfg.model.vocab_size == 0:
        cfg.model.vocab_size = task.tokenizer.vocab_size
    if cfg.model.vocab_size < task.tokenizer.vocab_size:
        raise ConfigError(f"model.vocab_size ({cfg.model.vocab_size}) is smaller than the "
                          f"{cfg.task.name} tokenizer ({task.tokenizer.vocab_size})")
    longest = task.max_prompt_len + cfg.generator.max_new_tokens
    if longest > cfg.model.max_seq_len:
        raise ConfigError(f"model.max_seq_len ({cfg.model.max_seq_len}) must hold the longest prompt "
                          f"({task.max_prompt_len}) + generator.max_new_tokens ({cfg.generator.max_new_tokens})")


def _require(ok: bool, message: str) -> None:
    if not ok:
        raise ConfigError(message)


def validate(cfg: Config) -> None:
    """Cross-field rules, checked once at load."""
    m, a = cfg.model, cfg.algo
    for role in ("generator", "judge", "learner"):
        num = getattr(cfg, role).num
        _require(num >= 1, f"{role}.num ({num}) must be at least 1")
    _require(a.prompts_per_step % cfg.learner.num == 0 or cfg.run.mode == "plan",
             f"learner.num ({cfg.learner.num}) must divide algo.prompts_per_step ({a.prompts_per_step})")
    _require(cfg.learner.warmup_batch % cfg.learner.num == 0 or cfg.run.mode == "plan",
             f"learner.num ({cfg.learner.num}) must divide learner.warmup_batch ({cfg.learner.warmup_batch})")
    _require(m.num_heads % m.num_kv_heads == 0,
             f"model.num_kv_heads ({m.num_kv_heads}) must divide model.num_heads ({m.num_heads})")
    _require(0 <= m.first_k_dense <= m.num_layers,
             f"model.first_k_dense ({m.first_k_dense}) must be within 0..model.num_layers ({m.num_layers})")
    _require(1 <= m.top_k <= m.num_experts, f"model.top_k ({m.top_k}) must be within 1..model.num_experts ({m.num_experts})")
    _require(m.num_experts % m.num_expert_groups == 0,
             f"model.num_expert_groups ({m.num_expert_groups}) must divide model.num_experts ({m.num_experts})")
    _require(1 <= m.topk_groups <= m.num_expert_groups,
             f"model.topk_groups ({m.topk_groups}) must be within 1..model.num_expert_groups ({m.num_expert_groups})")
    _require(m.top_k <= m.topk_groups * (m.num_experts // m.num_expert_groups),
             f"model.top_k ({m.top_k}) exceeds the experts in model.topk_groups ({m.topk_groups}) groups")
    _require(0 < m.rotary_fraction <= 1, f"model.rotary_fraction ({m.rotary_fraction}) must be in (0, 1]")
    _require(a.group_size >= 2, f"algo.group_size ({a.group_size}) must be at least 2 for group advantages")
    _require(a.prompts_per_step >= 1, f"algo.prompts_per_step ({a.prompts_per_step}) must be at least 1")
    _require(a.max_staleness >= 0, f"algo.max_staleness ({a.max_staleness}) must be >= 0")
    _require(a.mode in ("sync", "async"), f"algo.mode ({a.mode!r}) must be sync or async")
    _require(a.round_token_budget >= 0 and a.max_pauses >= 0,
             f"algo.round_token_budget ({a.round_token_budget}) and algo.max_pauses ({a.max_pauses}) must be >= 0")
    _require(not a.round_token_budget or cfg.learner.num == 1,
             f"algo.round_token_budget needs learner.num (={cfg.learner.num}) = 1: a round's batch is not split")
    _require(cfg.generator.kv_on_update in ("keep", "recompute"),
             f"generator.kv_on_update ({cfg.generator.kv_on_update!r}) must be keep or recompute")
    _require(0 <= a.icepop.alpha <= a.icepop.beta,
             f"algo.icepop.alpha ({a.icepop.alpha}) must be within 0..algo.icepop.beta ({a.icepop.beta})")
    _require(0 <= a.clip_low < 1, f"algo.clip_low ({a.clip_low}) must be in [0, 1)")
    _require(a.clip_high >= 0, f"algo.clip_high ({a.clip_high}) must be >= 0")
    _require(a.aggregation in AGGREGATIONS, f"algo.aggregation ({a.aggregation!r}) must be one of {AGGREGATIONS}")
    _require(a.aggregation != "token_budget" or a.token_budget > 0,
             f"algo.token_budget ({a.token_budget}) must be > 0 with algo.aggregation=token_budget")
    _require(cfg.generator.temperature >= 0, f"generator.temperature ({cfg.generator.temperature}) must be >= 0")
    _require(cfg.generator.max_slots >= a.group_size,
             f"generator.max_slots ({cfg.generator.max_slots}) must hold one group (algo.group_size {a.group_size})")
    _require(cfg.judge.timeout_s > 0, f"judge.timeout_s ({cfg.judge.timeout_s}) must be > 0")
    _validate_task(cfg)
    _validate_devices(cfg)
    for role in GPU_ROLES:
        threads = getattr(cfg, role).torch_threads
        _require(threads >= 1, f"{role}.torch_threads ({threads}) must be at least 1")
    _require(cfg.learner.warmup_threads >= 0, f"learner.warmup_threads ({cfg.learner.warmup_threads}) must be >= 0")
    _require(cfg.learner.stream_groups >= 0, f"learner.stream_groups ({cfg.learner.stream_groups}) must be >= 0")
    _require(cfg.run.mode in RUN_MODES, f"run.mode ({cfg.run.mode}) must be one of {RUN_MODES}")
    _require(cfg.run.steps >= 0, f"run.steps ({cfg.run.steps}) must be >= 0")
    _require(cfg.ray.placement in PLACEMENTS, f"ray.placement ({cfg.ray.placement!r}) must be one of {PLACEMENTS}")
    _require(cfg.ray.start_timeout_s > 0, f"ray.start_timeout_s ({cfg.ray.start_timeout_s}) must be > 0")
    _require(valid_host(cfg.comm.host),
             f"comm.host ({cfg.comm.host!r}) must be one of {HOST_POLICIES} or an IP address")
    _require(cfg.run.checkpoint_every >= 0, f"run.checkpoint_every ({cfg.run.checkpoint_every}) must be >= 0")
    _require(cfg.run.log_every_s > 0, f"run.log_every_s ({cfg.run.log_every_s}) must be > 0")
    _require(cfg.run.eval_every_s >= 0 and cfg.run.time_budget_s >= 0,
             f"run.eval_every_s ({cfg.run.eval_every_s}) and run.time_budget_s ({cfg.run.time_budget_s}) must be >= 0")
    _require(cfg.run.on_actor_failure in FAILURE_POLICIES,
             f"run.on_actor_failure ({cfg.run.on_actor_failure!r}) must be one of {FAILURE_POLICIES}")
    # a round's batch is counted in groups each generator sent since it started: a replacement
    # (or a missing generator) would leave the count short, and the round would never complete
    _require(not (a.round_token_budget and a.mode == "async") or cfg.run.on_actor_failure == "stop",
             f"algo.round_token_budget ({a.round_token_budget}) needs run.on_actor_failure=stop "
             f"(not {cfg.run.on_actor_failure}): C3PO++ rounds cannot take in a replaced generator")
    for key in ("resume", "init_from"):
        path = getattr(cfg.run, key)
        _require(not path or os.path.isdir(os.path.join(path, "checkpoints")),
                 f"run.{key} ({path!r}) is not a run directory with checkpoints")
    _require(not (cfg.run.resume and cfg.run.init_from), "run.resume and run.init_from exclude each other")
    _validate_eval(cfg)


def _validate_eval(cfg: Config) -> None:
    """run.mode=eval: a run to evaluate, samples to estimate pass@k from, a run directory of its own."""
    _require(cfg.eval.k >= 1, f"eval.k ({cfg.eval.k}) must be at least 1")
    _require(cfg.eval.temperature > 0, f"eval.temperature ({cfg.eval.temperature}) must be > 0 (the greedy "
                                       "accuracy is evaluated anyway)")
    if cfg.run.mode != "eval":
        return
    _require(bool(cfg.run.init_from), "run.mode=eval needs run.init_from=<run dir>: the run to evaluate")
    _require(not cfg.run.resume, f"run.mode=eval does not resume (run.resume={cfg.run.resume!r})")
    own_dir = os.path.abspath(os.path.join(cfg.run.out_dir, cfg.run.name)) if cfg.run.name else ""
    _require(own_dir != os.path.abspath(cfg.run.init_from),
             f"run.out_dir/run.name ({own_dir}) is the evaluated run: the evaluation writes into a run "
             "directory of its own, choose another run.name")


def _validate_task(cfg: Config) -> None:
    """Rules of the math and code judges: rewards within 0..1, sandbox limits that let Python start."""
    t, box = cfg.task, cfg.task.sandbox
    _require(0 <= t.format_reward < 1, f"task.format_reward ({t.format_reward}) must be in [0, 1)")
    _require(box.cpu_s >= 1, f"task.sandbox.cpu_s ({box.cpu_s}) must be at least 1 (RLIMIT_CPU counts whole seconds)")
    _require(box.wall_s > 0, f"task.sandbox.wall_s ({box.wall_s}) must be > 0")
    _require(box.memory_mb >= 64, f"task.sandbox.memory_mb ({box.memory_mb}) must be at least 64 for Python to start")
    _require(box.max_procs >= 1, f"task.sandbox.max_procs ({box.max_procs}) must be at least 1")
    _require(box.output_kb >= 1 and box.disk_mb >= 1,
             f"task.sandbox.output_kb ({box.output_kb}) and disk_mb ({box.disk_mb}) must be at least 1")


def actor_demands(cfg: Config) -> dict[str, dict[str, float]]:
    """The Ray resources each actor of the run asks for, by actor name."""
    demands = {}
    for role in ("learner", "judge", "generator"):
        section = getattr(cfg, role)
        demand = {"CPU": section.num_cpus, "GPU": getattr(section, "num_gpus", 0.0), **section.resources}
        demands.update({f"{role}-{i}": {k: v for k, v in demand.items() if v} for i in range(section.num)})
    return demands


def check_placeable(cfg: Config, nodes: list[dict[str, float]]) -> None:
    """Raise ConfigError, naming the resource, unless every actor fits on the nodes' resources
    (first fit, largest demands first); Ray itself would wait for them forever."""
    free = [dict(node) for node in nodes]
    demands = sorted(actor_demands(cfg).items(), key=lambda item: (-item[1].get("GPU", 0), -sum(item[1].values())))
    for name, demand in demands:
        node = next((n for n in free if all(n.get(k, 0.0) >= v - 1e-9 for k, v in demand.items())), None)
        if node is None:
            short = next(k for k, v in demand.items() if not any(n.get(k, 0.0) >= v - 1e-9 for n in free))
            wanted = sum(d.get(short, 0.0) for d in actor_demands(cfg).values())
            total = sum(n.get(short, 0.0) for n in nodes)
            raise ConfigError(f"the Ray cluster cannot place {name}: it needs {short} {demand[short]:g} and no node "
                              f"has that left (the actors ask for {wanted:g} {short}, the cluster's {len(nodes)} "
                              f"nodes have {total:g})")
        for k, v in demand.items():
            node[k] -= v


def resolve_host(cfg: Config, node_ips: list[str]) -> None:
    """Settle `comm.host = auto` from the Ray cluster's nodes (loopback on one, node on more)."""
    cfg.comm.host = resolve_policy(cfg.comm.host, node_ips)


def _validate_devices(cfg: Config) -> None:
    """Device settings that cannot work whatever the cluster holds."""
    for role in GPU_ROLES:
        section = getattr(cfg, role)
        device, gpus = section.device, section.num_gpus
        _require(device in DEVICE_SETTINGS, f"{role}.device ({device!r}) must be one of {DEVICE_SETTINGS}")
        _require(gpus == AUTO_GPUS or 0 <= gpus <= 1,
                 f"{role}.num_gpus ({gpus}) must be within 0..1 (an actor uses one device) or -1 (auto)")
        _require(not (device == "cpu" and gpus > 0), f"{role}.device=cpu holds no GPU ({role}.num_gpus {gpus})")
        _require(not (device == "cuda" and gpus == 0), f"{role}.device=cuda needs {role}.num_gpus > 0")
    learner = cfg.learner
    _require(not (learner.num > 1 and learner.device != "cpu" and 0 < learner.num_gpus < 1),
             f"learner.num ({learner.num}) CUDA learners need a whole GPU each (learner.num_gpus "
             f"{learner.num_gpus}): their FSDP group is NCCL, one rank per GPU")


def resolve_gpus(cfg: Config, cluster_gpus: float) -> None:
    """Fill `num_gpus = -1` (auto) from the GPUs of the Ray cluster, and check that the actors fit.

    Called by the driver once Ray is up, before any actor starts; raises ConfigError.
    """
    gpu_actors = {role: getattr(cfg, role).num for role in GPU_ROLES if getattr(cfg, role).device != "cpu"}
    for role in GPU_ROLES:
        section = getattr(cfg, role)
        _require(not (section.device == "cuda" and cluster_gpus == 0),
                 f"{role}.device=cuda but the Ray cluster has no GPU")
        if section.num_gpus == AUTO_GPUS:
            section.num_gpus = _auto_share(cluster_gpus, sum(gpu_actors.values())) if role in gpu_actors else 0.0
    learner = cfg.learner
    _require(not (learner.num > 1 and 0 < learner.num_gpus < 1),
             f"learner.num ({learner.num}) CUDA learners need a whole GPU each, the cluster has {cluster_gpus:g} "
             f"GPUs for {sum(gpu_actors.values())} GPU actors: add GPUs or set learner.device=cpu")
    wanted = sum(getattr(cfg, role).num * getattr(cfg, role).num_gpus for role in GPU_ROLES)
    _require(wanted <= cluster_gpus + 1e-6,
             f"the actors ask for {wanted:g} GPUs (learner.num {learner.num} x {learner.num_gpus:g}, generator.num "
             f"{cfg.generator.num} x {cfg.generator.num_gpus:g}), the Ray cluster has {cluster_gpus:g}")


def _auto_share(cluster_gpus: float, gpu_actors: int) -> float:
    """A whole GPU each when there are enough, else 1/n of one for the n actors a GPU must hold."""
    whole = math.floor(cluster_gpus)
    if whole == 0:
        return 0.0
    per_gpu = math.ceil(gpu_actors / whole)
    return 1.0 if per_gpu <= 1 else math.floor(10_000 / per_gpu) / 10_000  # Ray counts GPUs in 1e-4 steps
