"""Forward+backward throughput of one MoE layer against a dense SwiGLU of equal active FLOPs.

The dense FFN is `top_k * expert_ffn_size` wide, so both spend the same matmul FLOPs
per token (the MoE adds its router, D x E per token); the shared expert is off. Both
layers see the same tokens, are timed side by side in one process (alternating, after
a warm-up) and report the median of the repeats, so machine noise hits both alike.

    python bench/moe.py [--tokens 4096 --hidden 512 --experts 16 --top-k 4 --expert-ffn 256]
"""
import argparse
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from conf.schema import ModelConfig  # noqa: E402
from model.moe import MoE, SwiGLU  # noqa: E402


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=4096, help="tokens per forward+backward")
    parser.add_argument("--hidden", type=int, default=512, help="hidden size D")
    parser.add_argument("--experts", type=int, default=16, help="routed experts E")
    parser.add_argument("--top-k", type=int, default=4, help="experts per token K")
    parser.add_argument("--groups", type=int, default=4, help="expert groups (group-limited routing)")
    parser.add_argument("--topk-groups", type=int, default=2, help="groups a token may route into")
    parser.add_argument("--expert-ffn", type=int, default=256, help="hidden width of each expert F")
    parser.add_argument("--threads", type=int, default=2, help="torch intra-op threads")
    parser.add_argument("--warmup", type=int, default=3, help="untimed passes per layer")
    parser.add_argument("--repeats", type=int, default=10, help="timed passes per layer")
    return parser.parse_args(argv)


def build_layers(args) -> tuple[MoE, SwiGLU]:
    cfg = ModelConfig(hidden_size=args.hidden, num_experts=args.experts, top_k=args.top_k,
                      expert_ffn_size=args.expert_ffn, num_shared_experts=0,
                      num_expert_groups=args.groups, topk_groups=args.topk_groups, routed_scaling_factor=2.5)
    moe = MoE(cfg)
    for weight in (moe.router, moe.gate_proj, moe.up_proj, moe.down_proj):
        torch.nn.init.normal_(weight, std=cfg.init_std)
    dense = SwiGLU(args.hidden, args.top_k * args.expert_ffn)
    return moe.train(), dense.train()


def layer_output(layer: torch.nn.Module, x_BTD: torch.Tensor) -> torch.Tensor:
    """The FFN output; a MoE layer also returns the experts it picked, dropped here."""
    return layer(x_BTD)[0] if isinstance(layer, MoE) else layer(x_BTD)


def forward_backward_seconds(layer: torch.nn.Module, x_ND: torch.Tensor) -> float:
    """One training pass: forward, a scalar loss, backward into the input and the weights."""
    layer.zero_grad(set_to_none=True)
    x = x_ND.detach().requires_grad_(True)
    start = time.perf_counter()
    layer_output(layer, x[None]).square().mean().backward()
    return time.perf_counter() - start


def measure(layers: dict[str, torch.nn.Module], x_ND: torch.Tensor, warmup: int, repeats: int) -> dict[str, float]:
    """Median seconds per pass of each layer, interleaved so drift affects all alike."""
    for _ in range(warmup):
        for layer in layers.values():
            forward_backward_seconds(layer, x_ND)
    times = {name: [] for name in layers}
    for _ in range(repeats):
        for name, layer in layers.items():
            times[name].append(forward_backward_seconds(layer, x_ND))
    return {name: statistics.median(seconds) for name, seconds in times.items()}


def main(argv: list[str]) -> None:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    moe, dense = build_layers(args)
    x_ND = torch.randn(args.tokens, args.hidden)
    medians = measure({"moe": moe, "dense": dense}, x_ND, args.warmup, args.repeats)
    flops = 3 * 2 * 3 * args.tokens * args.hidden * args.top_k * args.expert_ffn  # 3 matmuls x fwd+2 bwd
    print(f"tokens {args.tokens}, D {args.hidden}, E {args.experts} top-{args.top_k} (F {args.expert_ffn}) "
          f"vs dense F {args.top_k * args.expert_ffn}; float32, {args.threads} threads, "
          f"median of {args.repeats} after {args.warmup} warm-up")
    for name, seconds in medians.items():
        print(f"{name:>5}: {args.tokens / seconds:10,.0f} tokens/s  {seconds * 1e3:7.1f} ms  "
              f"{flops / seconds / 1e9:5.1f} GFLOP/s (expert matmuls)")
    print(f"ratio moe/dense: {medians['dense'] / medians['moe']:.2f}")


if __name__ == "__main__":
    main(sys.argv[1:])
