"""Hugging Face interop: our model as a BailingMoeV2 (Ling-2.0) safetensors checkpoint.

`to_hf_state_dict` / `from_hf_state_dict` rename our parameters to those of the public
`modeling_bailing_moe_v2.py` (inclusionAI Ling-2.0) and back, `hf_config` /
`model_config_from_hf` do the same for config.json, and `save_hf_checkpoint` /
`load_hf_checkpoint` write and read a checkpoint directory: `config.json` plus
`model.safetensors`, or numbered shards plus `model.safetensors.index.json`.

Two tensors change layout on the way, not only their name:
  * q, k, v are fused into `attention.query_key_value`, whose [(H + 2G) * Dh, D] rows
    are all query heads, then the key heads, then the value heads;
  * our routed experts are stacked [E, F, D] / [E, D, F] tensors, BailingMoeV2 has one
    `mlp.experts.{e}` module per expert.
MTP depth j is BailingMoeV2's layer `model.layers.{num_hidden_layers + j}`.
"""
import json
import re
from collections import defaultdict
from dataclasses import fields
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from conf.schema import ModelConfig
from model.moe import MoECausalLM
from model.tokenizer import BOS, EOS, PAD

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"

_TOP_LEVEL = {
    "embed.weight": "model.word_embeddings.weight",
    "final_norm.weight": "model.norm.weight",
    "lm_head.weight": "lm_head.weight",
}
# Inside one decoder layer (a Block, also the block of an MTP depth) -> inside model.layers.{i}.
_BLOCK = {
    "input_norm.weight": "input_layernorm.weight",
    "post_attn_norm.weight": "post_attention_layernorm.weight",
    "attn.o_proj.weight": "attention.dense.weight",
    "attn.q_norm.weight": "attention.query_layernorm.weight",
    "attn.k_norm.weight": "attention.key_layernorm.weight",
    "ffn.gate_proj.weight": "mlp.gate_proj.weight",  # dense FFN
    "ffn.up_proj.weight": "mlp.up_proj.weight",
    "ffn.down_proj.weight": "mlp.down_proj.weight",
    "ffn.router": "mlp.gate.weight",
    "ffn.expert_bias": "mlp.gate.expert_bias",
    "ffn.shared.gate_proj.weight": "mlp.shared_experts.gate_proj.weight",
    "ffn.shared.up_proj.weight": "mlp.shared_experts.up_proj.weight",
    "ffn.shared.down_proj.weight": "mlp.shared_experts.down_proj.weight",
}
# Inside one MTP depth, outside its block -> inside model.layers.{num_layers + j}.
_MTP = {
    "hidden_norm.weight": "hnorm.weight",
    "embed_norm.weight": "enorm.weight",
    "eh_proj.weight": "eh_proj.weight",
    "final_norm.weight": "final_layernorm.weight",
}
_QKV = ("attn.q_proj.weight", "attn.k_proj.weight", "attn.v_proj.weight")
_FUSED_QKV = "attention.query_key_value.weight"
# A stacked routed-expert tensor -> the per-expert name of expert {e}.
_EXPERTS = {
    "ffn.gate_proj": "mlp.experts.{e}.gate_proj.weight",
    "ffn.up_proj": "mlp.experts.{e}.up_proj.weight",
    "ffn.down_proj": "mlp.experts.{e}.down_proj.weight",
}
_HF_LAYER = re.compile(r"model\.layers\.(\d+)\.(.+)")


def _rename(name: str, table: dict[str, str], where: str) -> str:
    if name not in table:
        raise KeyError(f"{where}{name} has no counterpart: extend the name tables in model/hf.py")
    return table[name]


def _inverse(table: dict[str, str]) -> dict[str, str]:
    return {theirs: ours for ours, theirs in table.items()}


# ---- our names -> BailingMoeV2 names ----

def to_hf_state_dict(model: MoECausalLM) -> dict[str, torch.Tensor]:
    """The model's state dict under BailingMoeV2 names (sharing storage where the layout is unchanged)."""
    num_layers = model.cfg.num_layers
    hf, blocks, mtp_parts = {}, defaultdict(dict), defaultdict(dict)
    for name, tensor in model.state_dict().items():
        kind, index, inner = _locate_ours(name, num_layers)
        if kind == "top":
            hf[_rename(name, _TOP_LEVEL, "")] = tensor
        else:
            (blocks if kind == "block" else mtp_parts)[index][inner] = tensor
    for index, block in blocks.items():
        prefix = f"model.layers.{index}."
        layer = _block_to_hf(block, prefix) | _mtp_to_hf(mtp_parts[index], prefix)
        hf.update({prefix + name: t for name, t in layer.items()})
    return hf


def _locate_ours(name: str, num_layers: int) -> tuple[str, int, str]:
    """(kind "top" | "block" | "mtp", BailingMoeV2 layer index, name inside that layer)."""
    head, _, rest = name.partition(".")
    if head == "blocks":
        index, _, inner = rest.partition(".")
        return "block", int(index), inner
    if head == "mtp":
        depth, _, inner = rest.partition(".")
        if inner.startswith("block."):
            return "block", num_layers + int(depth), inner.removeprefix("block.")
        return "mtp", num_layers + int(depth), inner
    return "top", -1, name


def _block_to_hf(block: dict, where: str) -> dict:
    block = dict(block)
    hf = {_FUSED_QKV: torch.cat([block.pop(name) for name in _QKV])}
    for ours, per_expert in _EXPERTS.items():
        if ours in block:
            # clones: safetensors refuses tensors that share storage (views of one stack)
            hf.update({per_expert.format(e=e): w.clone() for e, w in enumerate(block.pop(ours))})
    hf.update({_rename(name, _BLOCK, where): t for name, t in block.items()})
    return hf


def _mtp_to_hf(parts: dict, where: str) -> dict:
    return {_rename(name, _MTP, where): t for name, t in parts.items()}


# ---- BailingMoeV2 names -> our names ----

def from_hf_state_dict(state: dict[str, torch.Tensor], cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """A BailingMoeV2 state dict under our names, ready for `MoECausalLM(cfg).load_state_dict`."""
    ours, layers = {}, defaultdict(dict)
    for name, tensor in state.items():
        match = _HF_LAYER.fullmatch(name)
        if match:
            layers[int(match[1])][match[2]] = tensor
        else:
            ours[_rename(name, _inverse(_TOP_LEVEL), "")] = tensor
    for index, layer in layers.items():
        ours.update(_layer_from_hf(index, layer, cfg))
    return ours


def _layer_from_hf(index: int, layer: dict, cfg: ModelConfig) -> dict:
    where = f"model.layers.{index}."
    if index < cfg.num_layers:
        return {f"blocks.{index}.{name}": t for name, t in _block_from_hf(layer, cfg, where).items()}
    depth_prefix = f"mtp.{index - cfg.num_layers}."
    mtp_names = _inverse(_MTP)
    parts = {mtp_names[name]: t for name, t in layer.items() if name in mtp_names}
    block = _block_from_hf({name: t for name, t in layer.items() if name not in mtp_names}, cfg, where)
    return ({depth_prefix + name: t for name, t in parts.items()}
            | {f"{depth_prefix}block.{name}": t for name, t in block.items()})


def _block_from_hf(layer: dict, cfg: ModelConfig, where: str) -> dict:
    layer = dict(layer)
    q_rows, kv_rows = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
    ours = dict(zip(_QKV, layer.pop(_FUSED_QKV).split([q_rows, kv_rows, kv_rows])))
    for stacked, per_expert in _EXPERTS.items():
        if per_expert.format(e=0) in layer:
            ours[stacked] = torch.stack([layer.pop(per_expert.format(e=e)) for e in range(cfg.num_experts)])
    ours.update({_rename(name, _inverse(_BLOCK), where): t for name, t in layer.items()})
    return ours


# ---- config.json ----

# ModelConfig field -> BailingMoeV2 config.json key holding the same value.
_CONFIG_KEYS = {
    "vocab_size": "vocab_size",
    "hidden_size": "hidden_size",
    "num_layers": "num_hidden_layers",
    "first_k_dense": "first_k_dense_replace",
    "num_heads": "num_attention_heads",
    "num_kv_heads": "num_key_value_heads",
    "head_dim": "head_dim",
    "rotary_fraction": "partial_rotary_factor",
    "rope_base": "rope_theta",
    "dense_ffn_size": "intermediate_size",
    "num_experts": "num_experts",
    "top_k": "num_experts_per_tok",
    "expert_ffn_size": "moe_intermediate_size",
    "num_expert_groups": "n_group",
    "topk_groups": "topk_group",
    "routed_scaling_factor": "routed_scaling_factor",
    "norm_eps": "rms_norm_eps",
    "max_seq_len": "max_position_embeddings",
    "init_std": "initializer_range",
    "num_mtp_layers": "num_nextn_predict_layers",
}
# What our architecture always is; a config.json stating otherwise describes another model.
_FIXED = {
    "architectures": ["BailingMoeV2ForCausalLM"],
    "model_type": "bailing_moe_v2",
    "hidden_act": "silu",
    "score_function": "sigmoid",
    "moe_router_enable_expert_bias": True,
    "norm_topk_prob": True,
    "use_qk_norm": True,
    "use_qkv_bias": False,
    "use_bias": False,
    "tie_word_embeddings": False,
    "rope_scaling": None,
}
# ModelConfig fields that are not architecture, kept under this key so config.json round-trips.
_RINGRL_KEY = "ringrl"
_RINGRL_FIELDS = ("preset", "expert_bias_rate")
_FOREIGN_PRESET = "hf"


def hf_config(cfg: ModelConfig) -> dict:
    """BailingMoeV2 config.json contents for `cfg` (the special token ids are ringrl's tokenizers')."""
    config = dict(_FIXED)
    config.update({theirs: getattr(cfg, ours) for ours, theirs in _CONFIG_KEYS.items()})
    config.update({
        "num_shared_experts": cfg.num_shared_experts or None,  # BailingMoeV2 builds none only for None
        "moe_shared_expert_intermediate_size": cfg.expert_ffn_size * cfg.num_shared_experts,
        "router_dtype": "fp32",
        "pad_token_id": PAD, "bos_token_id": BOS, "eos_token_id": EOS,
        _RINGRL_KEY: {name: getattr(cfg, name) for name in _RINGRL_FIELDS},
    })
    return config


def model_config_from_hf(config: dict) -> ModelConfig:
    """The ModelConfig of a BailingMoeV2 config.json; ValueError if it is not our architecture.

    Without a "ringrl" section (a checkpoint from elsewhere) the preset is "hf" and the
    expert-bias rate keeps its ModelConfig default.
    """
    for key, value in _FIXED.items():
        if key in config and config[key] != value:
            raise ValueError(f"config.json {key} is {config[key]!r}; ringrl's model needs {value!r}")
    missing = [theirs for theirs in _CONFIG_KEYS.values() if theirs not in config]
    if missing:
        raise ValueError(f"config.json lacks BailingMoeV2 keys {missing}")
    types = {f.name: f.type for f in fields(ModelConfig)}
    values = {ours: types[ours](config[theirs]) for ours, theirs in _CONFIG_KEYS.items()}
    values["num_shared_experts"] = config.get("num_shared_experts") or 0
    values.update(config.get(_RINGRL_KEY, {"preset": _FOREIGN_PRESET}))
    return ModelConfig(**values)


# ---- checkpoint directories ----

def save_hf_checkpoint(model: MoECausalLM, directory, max_shard_bytes: int = 5 * 2**30) -> None:
    """Write config.json and the weights: one model.safetensors when they fit in
    `max_shard_bytes`, else shards of at most that size (a larger tensor gets a shard of
    its own) listed in model.safetensors.index.json. Weight files already there are removed."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    for stale in [*directory.glob("model*.safetensors"), directory / INDEX_FILE]:
        stale.unlink(missing_ok=True)
    state = to_hf_state_dict(model)
    config = hf_config(model.cfg) | {"torch_dtype": str(model.lm_head.weight.dtype).removeprefix("torch.")}
    (directory / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    shards = _plan_shards(state, max_shard_bytes)
    if len(shards) == 1:
        save_file(state, str(directory / SINGLE_FILE), metadata={"format": "pt"})
        return
    weight_map = {}
    for number, names in enumerate(shards, start=1):
        file = f"model-{number:05d}-of-{len(shards):05d}.safetensors"
        save_file({name: state[name] for name in names}, str(directory / file), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(names, file))
    index = {"metadata": {"total_size": sum(_nbytes(t) for t in state.values())}, "weight_map": weight_map}
    (directory / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")


def _nbytes(tensor: torch.Tensor) -> int:
    return tensor.numel() * tensor.element_size()


def _plan_shards(state: dict, max_shard_bytes: int) -> list[list[str]]:
    """Tensor names per shard, in state order, each shard filled up to `max_shard_bytes`."""
    shards, size = [[]], 0
    for name, tensor in state.items():
        if shards[-1] and size + _nbytes(tensor) > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(name)
        size += _nbytes(tensor)
    return shards


def load_hf_state_dict(directory) -> dict[str, torch.Tensor]:
    """All tensors of a checkpoint directory, sharded or not, under their file names."""
    directory = Path(directory)
    if (directory / INDEX_FILE).exists():
        weight_map = json.loads((directory / INDEX_FILE).read_text())["weight_map"]
        state = {}
        for file in sorted(set(weight_map.values())):
            state.update(load_file(str(directory / file)))
        return state
    return load_file(str(directory / SINGLE_FILE))


def load_hf_checkpoint(directory) -> MoECausalLM:
    """A float32 MoECausalLM built from a BailingMoeV2 checkpoint directory (strict load)."""
    directory = Path(directory)
    cfg = model_config_from_hf(json.loads((directory / "config.json").read_text()))
    model = MoECausalLM(cfg)
    model.load_state_dict(from_hf_state_dict(load_hf_state_dict(directory), cfg))
    return model
