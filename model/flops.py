"""Model FLOPs and the machine's matmul peak, for model FLOPs utilisation (MFU).

MFU = useful model FLOPs / (seconds * peak FLOP/s). Useful means what the model needs,
not what a kernel happened to run: per token, the matmuls of its active parameters
(attention projections, the dense FFN or the router + top_k routed + shared experts,
the LM head; 2 FLOPs per multiply-add) plus attention scores and values over the keys
it attends to (4 * heads * head_dim FLOPs per key per layer). Padding, idle experts and
masked-out keys count nothing. Training a token costs 3 forwards (forward, and a backward
that computes gradients of both activations and weights).

    seconds = ...                                      # time of the work below
    flops = generation_flops(cfg, prompt_len, completion_len)  # one finished rollout
    flops = training_flops(cfg, [P + C - 1 for each trained sample])  # one optimizer step
    mfu = flops / (seconds * matmul_peak_flops(cfg.hidden_size, torch.get_num_threads()))
"""
import json
import os
import platform
import socket
import time
from pathlib import Path

import torch

from conf.schema import ModelConfig

PEAK_CACHE = Path.home() / ".cache" / "ringrl" / "matmul_peak.json"
PEAK_ROWS, PEAK_REPEATS = 4096, 5


def matmul_params_per_token(cfg: ModelConfig) -> int:
    """Weights each token multiplies through in a forward pass (the active parameters, no embedding)."""
    D, Dh = cfg.hidden_size, cfg.head_dim
    attention = D * (cfg.num_heads + 2 * cfg.num_kv_heads) * Dh + cfg.num_heads * Dh * D
    dense_ffn = 3 * D * cfg.dense_ffn_size
    moe_ffn = D * cfg.num_experts + 3 * D * cfg.expert_ffn_size * (cfg.top_k + cfg.num_shared_experts)
    num_moe = cfg.num_layers - cfg.first_k_dense
    return cfg.num_layers * attention + cfg.first_k_dense * dense_ffn + num_moe * moe_ffn + D * cfg.vocab_size


def forward_flops(cfg: ModelConfig, num_tokens: int, attended_keys: int) -> float:
    """Forward FLOPs of `num_tokens` tokens that attend over `attended_keys` keys in all (summed over tokens)."""
    attention_per_key = 4 * cfg.num_heads * cfg.head_dim * cfg.num_layers
    return 2.0 * matmul_params_per_token(cfg) * num_tokens + float(attention_per_key) * attended_keys


def causal_keys(length: int) -> int:
    """Keys attended over by a causal sequence of `length` positions: 1 + 2 + ... + length."""
    return length * (length + 1) // 2


def sequence_forward_flops(cfg: ModelConfig, lengths) -> float:
    """Forward FLOPs of causal sequences of the given lengths (positions fed through the model)."""
    lengths = [int(n) for n in lengths]
    return forward_flops(cfg, sum(lengths), sum(causal_keys(n) for n in lengths))


def generation_flops(cfg: ModelConfig, prompt_len: int, completion_len: int) -> float:
    """Forward FLOPs a generator spends on one rollout: prefill of the prompt and one decode step per
    completion token but the last (which is sampled, never fed back): P + C - 1 positions, causal."""
    return sequence_forward_flops(cfg, [prompt_len + completion_len - 1])


def training_flops(cfg: ModelConfig, lengths) -> float:
    """Forward + backward FLOPs (3 forwards) of training on causal sequences of the given input lengths."""
    return 3.0 * sequence_forward_flops(cfg, lengths)


def mfu(flops: float, seconds: float, peak_flops: float) -> float:
    return flops / (seconds * peak_flops)


def matmul_peak_flops(width: int, threads: int, device: torch.device = torch.device("cpu"),
                      dtype: torch.dtype = torch.float32) -> float:
    """Matmul FLOP/s of this machine at the model's width: float32 on `threads` CPU threads, or
    on a GPU in the dtype the actor computes in (bf16).

    Measured once per machine (and GPU model), width, thread count, dtype and torch version with
    a [4096, width] @ [width, 4 * width] matmul (best of 5), then read from a JSON cache in
    ~/.cache/ringrl/. The measurement sets the torch thread count and restores it.
    """
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else f"threads={threads}"
    key = f"{_machine()}|width={width}|{where}|{str(dtype).removeprefix('torch.')}|torch={torch.__version__}"
    cache = json.loads(PEAK_CACHE.read_text()) if PEAK_CACHE.exists() else {}
    if key not in cache:
        cache[key] = _measure_matmul_flops(width, threads, device, dtype)
        PEAK_CACHE.parent.mkdir(parents=True, exist_ok=True)
        temporary = PEAK_CACHE.with_suffix(f".{os.getpid()}.tmp")
        temporary.write_text(json.dumps(cache, indent=1))
        temporary.replace(PEAK_CACHE)
    return cache[key]


def _measure_matmul_flops(width: int, threads: int, device: torch.device, dtype: torch.dtype) -> float:
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        a = torch.randn(PEAK_ROWS, width, device=device, dtype=dtype)
        b = torch.randn(width, 4 * width, device=device, dtype=dtype)
        out = a @ b  # warm-up, and the output buffer reused below
        best = float("inf")
        for _ in range(PEAK_REPEATS):
            _synchronize(device)
            start = time.perf_counter()
            torch.matmul(a, b, out=out)
            _synchronize(device)
            best = min(best, time.perf_counter() - start)
    finally:
        torch.set_num_threads(previous)
    return 2.0 * PEAK_ROWS * width * 4 * width / best


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _machine() -> str:
    """Host name and CPU model: the peak belongs to the machine, not to the path it runs from."""
    cpu = platform.processor()
    if os.path.exists("/proc/cpuinfo"):
        with open("/proc/cpuinfo") as info:
            names = [line.split(":", 1)[1].strip() for line in info if line.startswith("model name")]
        cpu = names[0] if names else cpu
    return f"{socket.gethostname()}|{cpu}"
