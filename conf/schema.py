"""The config schema: dataclasses with defaults and a help string per field.

Hydra YAML (conf/config.yaml and the groups beside it) only supplies values;
command-line overrides (`python run.py generator.num=3 learner.lr=3e-4`) are
merged on top and the result is checked once by `conf.load.validate`.
"""
from dataclasses import dataclass, field


def _f(default, help: str):
    """A dataclass field with a default and a help string kept in its metadata."""
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata={"help": help})
    return field(default=default, metadata={"help": help})


def _gpus_help(role: str) -> str:
    return (f"GPUs per {role} actor, fractions share a GPU; -1 = auto: none on a cluster without GPUs, a "
            "whole GPU each when there is one for every GPU actor, else an equal share (with one GPU, a "
            "generator and a learner share it)")


@dataclass
class ModelConfig:
    preset: str = _f("tiny", "name of the preset these values came from")
    vocab_size: int = _f(0, "vocabulary size (0: the task tokenizer's)")
    hidden_size: int = _f(128, "residual stream width")
    num_layers: int = _f(3, "transformer blocks")
    first_k_dense: int = _f(1, "the first k blocks use a dense FFN, the rest MoE")
    num_heads: int = _f(4, "query heads")
    num_kv_heads: int = _f(2, "key/value heads (GQA)")
    head_dim: int = _f(32, "per-head width")
    rotary_fraction: float = _f(0.5, "fraction of head_dim that gets rotary embedding")
    rope_base: float = _f(600000.0, "RoPE base frequency")
    dense_ffn_size: int = _f(256, "hidden width of the dense FFN blocks")
    num_experts: int = _f(8, "routed experts per MoE block")
    top_k: int = _f(2, "routed experts per token")
    expert_ffn_size: int = _f(64, "hidden width of each routed expert")
    num_shared_experts: int = _f(1, "always-on shared experts per MoE block")
    num_expert_groups: int = _f(1, "expert groups for group-limited routing")
    topk_groups: int = _f(1, "groups a token may route into")
    routed_scaling_factor: float = _f(1.0, "multiplier on the renormalised top-k weights")
    expert_bias_rate: float = _f(1e-3, "step of the aux-loss-free expert bias update (0 disables)")
    norm_eps: float = _f(1e-6, "RMSNorm epsilon")
    max_seq_len: int = _f(64, "longest prompt+completion the model is built for")
    init_std: float = _f(0.02, "std of the normal weight init")
    num_mtp_layers: int = _f(0, "multi-token-prediction layers (each predicts one token further)")


@dataclass
class SandboxConfig:
    cpu_s: int = _f(2, "CPU seconds per program run (RLIMIT_CPU)")
    wall_s: float = _f(4.0, "wall-clock seconds per program run; then the whole process tree is killed")
    memory_mb: int = _f(512, "address space of each candidate process (RLIMIT_AS)")
    max_procs: int = _f(16, "processes a candidate may run at once (RLIMIT_NPROC of the run's own uid)")
    output_kb: int = _f(64, "stdout + stderr captured per run; more ends the run as output_limit")
    disk_mb: int = _f(16, "size of the candidate's writable /tmp (a tmpfs); also the largest file it may write")


@dataclass
class TaskConfig:
    name: str = _f("carry_add", "task: carry_add | carry_add_longtail (built in) | math | code (JSONL datasets; "
                                "select with task=math / task=code, see conf/task/)")
    digits: int = _f(2, "digits per operand")
    think_per_carry: int = _f(25, "carry_add_longtail: thinking tokens per carry before the answer")
    carry_slip: float = _f(0.7, "warm-up demos drop each carry with this probability (imperfect SFT data)")
    eval_prompts: int = _f(256, "held-out prompts for greedy evaluation")
    seed: int = _f(0, "seed of prompt sampling and the held-out split")
    dataset: str = _f("", "math/code: folder with train.jsonl, eval.jsonl, tokenizer.json ('' = the shipped set)")
    format_reward: float = _f(0.0, "math/code: reward of a wrong but well-formed completion (math: a final "
                                   "answer was found; code: the program ran); 0 turns it off")
    partial_credit: bool = _f(False, "code: reward the fraction of tests passed instead of 1 only if all pass")
    sandbox: SandboxConfig = field(default_factory=SandboxConfig)


@dataclass
class GeneratorConfig:
    num: int = _f(1, "generator actors")
    num_cpus: float = _f(1.0, "CPUs reserved per generator actor")
    resources: dict[str, float] = _f({}, "custom Ray resources each generator needs (pins the role to nodes "
                                              "started with them: ray start --resources)")
    device: str = _f("auto", "auto | cpu | cuda: where the engine's model, KV cache and sampling live "
                             "(auto: cuda when Ray grants the actor a GPU); bf16 on CUDA, float32 on CPU")
    num_gpus: float = _f(-1.0, _gpus_help("generator"))
    max_slots: int = _f(256, "sequences decoded together (continuous batching slots)")
    max_new_tokens: int = _f(16, "completion length limit")
    temperature: float = _f(1.0, "sampling temperature (the learner uses the same)")
    torch_threads: int = _f(1, "torch intra-op threads in each generator. 1: per core, the engine is most "
                               "efficient on one thread (bench/mfu.py, model=small, 2-core machine: decode MFU at "
                               "256 sequences 0.54 on 1 thread, 0.50 on 2), and the learner needs the other core")
    kv_on_update: str = _f("keep", "on an in-flight weight update or a C3PO++ round's end: keep the KV cache "
                                   "(cut rollouts stay in their slots), or recompute it")


@dataclass
class JudgeConfig:
    num: int = _f(1, "judge actors")
    num_cpus: float = _f(0.25, "CPUs reserved per judge actor")
    resources: dict[str, float] = _f({}, "custom Ray resources each judge needs (pins the role to nodes "
                                              "started with them: ray start --resources)")
    timeout_s: float = _f(5.0, "per-sample scoring timeout: the scorer is killed, the sample scores 0 "
                               "and judge_timeout is counted")


@dataclass
class LearnerConfig:
    num: int = _f(1, "learner actors (shards)")
    num_cpus: float = _f(1.0, "CPUs reserved per learner actor")
    resources: dict[str, float] = _f({}, "custom Ray resources each learner needs (pins the role to nodes "
                                              "started with them: ray start --resources)")
    device: str = _f("auto", "auto | cpu | cuda: where the learner's model and optimizer live (auto: cuda "
                             "when Ray grants the actor a GPU); on CUDA bf16 autocast over float32 master weights")
    num_gpus: float = _f(-1.0, _gpus_help("learner"))
    lr: float = _f(1e-3, "AdamW learning rate for RL")
    weight_decay: float = _f(0.0, "AdamW weight decay")
    grad_clip: float = _f(1.0, "max gradient norm")
    warmup_steps: int = _f(300, "supervised warm-up steps on imperfect demonstrations")
    warmup_lr: float = _f(3e-3, "learning rate of the supervised warm-up")
    warmup_batch: int = _f(128, "demonstrations per warm-up step")
    torch_threads: int = _f(1, "torch intra-op threads in each learner during RL. 1: per core, the RL step is "
                               "most efficient on one thread (bench/mfu.py, model=small, 2-core machine: MFU 0.62 "
                               "on 1 thread, 0.54 on 2), and the generator needs the other core")
    warmup_threads: int = _f(0, "torch threads of each learner during the supervised warm-up, while the "
                                "generators idle (0: this node's cores divided by learner.num; bench/mfu.py on 2 "
                                "cores: a tiny-model learner step 2.1x, a small-model one 1.6x faster on 2 threads)")
    recv_timeout_s: float = _f(120.0, "longest wait for trajectories before the step fails")
    stream_groups: int = _f(8, "groups per micro-batch a learner computes (forward and backward) while the rest "
                               "of its batch arrives, so that only the last micro-batch and the optimizer step "
                               "follow the last group (0: the whole batch once it is in). 8 groups train as fast "
                               "as whole batches, 4 about 8% slower (bench/RESULTS.md, fifth pass). A C3PO++ batch "
                               "streams while its round runs; sharded learners (learner.num > 1) take their batch "
                               "at once")
    mtp_loss_weight: float = _f(0.3, "weight of the MTP loss in supervised warm-up steps")


@dataclass
class IcePopConfig:
    alpha: float = _f(0.5, "IcePop lower bound on k = pi_train/pi_infer")
    beta: float = _f(5.0, "IcePop upper bound on k")


@dataclass
class AlgoConfig:
    mode: str = _f("async", "sync: generate a batch, score, train, broadcast, repeat; async: streaming with "
                   "admission control (max_staleness) and C3PO++ rounds (round_token_budget)")
    round_token_budget: int = _f(0, "C3PO++ Phi: tokens the generator pool makes per round (one training "
                                 "step); the round's finished groups form the batch, unfinished rollouts "
                                 "pause and resume under the next policy (0: batches of prompts_per_step)")
    max_pauses: int = _f(2, "C3PO++ sigma: a rollout cut more often than this is purged (counted)")
    group_size: int = _f(8, "completions per prompt (G)")
    prompts_per_step: int = _f(32, "prompts per training batch; B = prompts_per_step * group_size")
    max_staleness: int = _f(1, "eta: batches that may be admitted ahead of the learner (0 = on-policy)")
    clip_low: float = _f(0.2, "PPO clip epsilon below 1")
    clip_high: float = _f(0.2, "PPO clip epsilon above 1")
    aggregation: str = _f("seq_mean", "loss aggregation: seq_mean | token_mean | token_budget")
    token_budget: int = _f(0, "Phi for token_budget aggregation")
    normalize_std: bool = _f(True, "divide GRPO advantages by the group std")
    filter_uninformative: bool = _f(True, "leave groups whose rewards are all equal out of the forward and "
                                          "backward passes (counted as dropped); their loss is zero and they still "
                                          "count in the loss's divisor, so the gradient is the same as without")
    routing_replay: bool = _f(False, "R3: the learner routes each token to the experts the generator used")
    icepop: IcePopConfig = field(default_factory=IcePopConfig)


@dataclass
class CommConfig:
    host: str = _f("auto", "where endpoints bind: loopback (127.0.0.1), node (each actor's Ray node address), "
                           "auto (loopback on one node, node on more) or an interface address (0.0.0.0: all, "
                           "peers are told the node address); CURVE off loopback")
    hwm: int = _f(64, "ZeroMQ high-water mark in groups (backpressure)")
    send_timeout_s: float = _f(120.0, "longest a send may block at the high-water mark")
    bucket_mb: float = _f(16.0, "weight broadcast bucket size in MiB (16 beat 32 and 64 on CPU/gloo: "
                                "bench/weight_sync.py, bench/RESULTS.md; a tensor alone in its bucket is sent "
                                "without a copy)")
    collective_timeout_s: float = _f(120.0, "timeout of every weight-group collective")


@dataclass
class RayConfig:
    address: str = _f("", "'' starts a local Ray instance; 'auto' or ray://host:port attaches")
    num_cpus: int = _f(0, "CPUs of the local instance (0: Ray decides)")
    dashboard: bool = _f(True, "start the Ray dashboard with a local instance")
    placement: str = _f("pack", "pack: Ray fills a node before the next; spread: each role's actors over as many "
                                "nodes as it can")
    start_timeout_s: float = _f(30.0, "longest the actors may wait to be placed before the run stops, naming them")
    bind_cores: bool = _f(True, "algo.mode=async: when RL starts, bind each CPU generator's decode thread to "
                                "cores of its own (generator.torch_threads each) and every other thread of the "
                                "actors and the driver on its machine to the rest, so that they do not take the "
                                "decode thread's core (bench/RESULTS.md, sixth pass); a machine whose generators "
                                "would leave no core for the rest is left to the OS")


@dataclass
class RunConfig:
    mode: str = _f("train", "train: the RL pipeline; plan: print the model's parameter and shard plan, no actors; "
                            "eval: evaluate the newest complete checkpoint of run.init_from on the held-out prompts "
                            "(greedy accuracy and pass@k, see eval.*) into a new run directory, no training")
    resume: str = _f("", "run directory to resume from its newest complete checkpoint, with the run's own "
                         "overrides ('' = fresh start)")
    init_from: str = _f("", "start a new run from the policy (model, optimizer, version) of this run directory's "
                            "newest checkpoint instead of the warm-up ('' = warm up); with run.mode=eval, the "
                            "run to evaluate")
    checkpoint_every: int = _f(50, "RL steps between checkpoints (0: only at the end); each holds the "
                                   "model, optimizer and the whole asynchronous state")
    on_actor_failure: str = _f("restart", "a generator or judge died: restart (replace it), continue (without "
                                          "it) or stop the run; its prompts are re-issued")
    steps: int = _f(60, "RL steps (optimizer steps)")
    seed: int = _f(0, "torch seed of the model init and sampling")
    out_dir: str = _f("runs", "parent folder of run directories")
    name: str = _f("", "run directory name ('' = timestamp)")
    eval_every: int = _f(0, "evaluate every n RL steps (0: only before and after)")
    eval_at_trained_samples: int = _f(0, "also evaluate once when this many samples have been trained (0: off)")
    eval_every_s: float = _f(0.0, "also evaluate each time this many seconds of RL have passed (0: off); "
                                  "evaluations pause the RL clock")
    time_budget_s: float = _f(0.0, "stop RL after this many seconds of wall time, evaluations not counted "
                                   "(0: run.steps only)")
    progress: bool = _f(True, "show progress: a bar on a terminal, else a status line every run.log_every_s")
    log_every_s: float = _f(30.0, "seconds between status lines when stdout is not a terminal")


@dataclass
class EvalConfig:
    k: int = _f(8, "run.mode=eval: completions sampled per held-out prompt; pass@j for j = 1, 2, 4, ... and k "
                   "with the unbiased estimator over these k samples")
    temperature: float = _f(1.0, "run.mode=eval: sampling temperature of the pass@k samples (the greedy "
                                 "accuracy is at 0); sampling is seeded from run.seed")


@dataclass
class PlanConfig:
    param_bytes: int = _f(2, "bytes per parameter of the trained and the synced weights (bf16: 2)")
    grad_bytes: int = _f(2, "bytes per gradient element (bf16: 2)")
    optimizer_bytes_per_param: int = _f(12, "optimizer state per parameter (fp32 master + 2 Adam moments: 12)")
    expert_parallel: int = _f(0, "EP degree of the FSDP+EP plan (0: gcd(learner.num, model.num_experts))")
    link_gbps: float = _f(400.0, "bandwidth of one weight-sync link, Gbit/s: into a generator replica (today's "
                                 "path), or of each replica GPU and each learner rank (the sharded path)")
    bucket_efficiency: float = _f(0.88, "fraction of link_gbps the bucketed broadcast achieves: measured ours/raw "
                                        "bandwidth of bench/weight_sync.py (median of its 28 rows at >= 100M params, "
                                        "1-4 subscribers, 16 MiB buckets, gloo on 2 CPUs; bench/RESULTS.md, issue 5)")
    gpus_per_replica: int = _f(0, "GPUs of one inference (generator) replica in the sharded point-to-point sync "
                                  "plan, one link each; 0: the fewest whose plan.gpu_memory_gb hold the weights")
    gpu_memory_gb: float = _f(141.0, "memory of one inference GPU, GB = 1e9 bytes (H200: 141); a replica GPU's "
                                     "weight shard must fit in it")


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    task: TaskConfig = field(default_factory=TaskConfig)
    generator: GeneratorConfig = field(default_factory=GeneratorConfig)
    judge: JudgeConfig = field(default_factory=JudgeConfig)
    learner: LearnerConfig = field(default_factory=LearnerConfig)
    algo: AlgoConfig = field(default_factory=AlgoConfig)
    comm: CommConfig = field(default_factory=CommConfig)
    ray: RayConfig = field(default_factory=RayConfig)
    run: RunConfig = field(default_factory=RunConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    plan: PlanConfig = field(default_factory=PlanConfig)
