"""Hugging Face interop: BailingMoeV2 names and layouts, config.json, safetensors round trips,
and our forward pass against transformers' Glm4MoeForCausalLM on the same weights."""
import json
from dataclasses import fields

import pytest
import torch
from safetensors import safe_open

from conf.schema import ModelConfig
from model.hf import (hf_config, load_hf_checkpoint, load_hf_state_dict, model_config_from_hf,
                      save_hf_checkpoint, to_hf_state_dict)
from model.moe import MoECausalLM


def routed_model(num_mtp_layers=1) -> MoECausalLM:
    """A tiny model whose routing uses every feature: groups, scaling, a nonzero expert bias.

    head_dim * num_heads != hidden_size, so a wrong q/k/v split cannot pass by shape.
    """
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=20, hidden_size=64, num_layers=3, first_k_dense=1, num_heads=4,
                      num_kv_heads=2, head_dim=24, num_experts=8, top_k=2, expert_ffn_size=32,
                      num_expert_groups=4, topk_groups=2, routed_scaling_factor=2.5, max_seq_len=48,
                      init_std=0.1, num_mtp_layers=num_mtp_layers, preset="test", expert_bias_rate=0.01)
    model = MoECausalLM(cfg).eval()
    with torch.no_grad():
        for moe in model.moe_layers():
            moe.expert_bias.copy_(torch.randn(cfg.num_experts) * 0.1)
        for name, param in model.named_parameters():
            if name.endswith("norm.weight"):  # non-trivial norms, so a swapped norm shows
                param.uniform_(0.5, 1.5)
    return model


def expected_hf_names(cfg: ModelConfig) -> set[str]:
    """The BailingMoeV2 parameter names, written out from modeling_bailing_moe_v2.py."""
    names = {"model.word_embeddings.weight", "model.norm.weight", "lm_head.weight"}
    for i in range(cfg.num_layers + cfg.num_mtp_layers):
        p = f"model.layers.{i}."
        names |= {p + "input_layernorm.weight", p + "post_attention_layernorm.weight",
                  p + "attention.query_key_value.weight", p + "attention.dense.weight",
                  p + "attention.query_layernorm.weight", p + "attention.key_layernorm.weight"}
        if i < cfg.first_k_dense:
            names |= {p + f"mlp.{w}.weight" for w in ("gate_proj", "up_proj", "down_proj")}
            continue
        names |= {p + "mlp.gate.weight", p + "mlp.gate.expert_bias"}
        names |= {p + f"mlp.shared_experts.{w}.weight" for w in ("gate_proj", "up_proj", "down_proj")}
        names |= {p + f"mlp.experts.{e}.{w}.weight"
                  for e in range(cfg.num_experts) for w in ("gate_proj", "up_proj", "down_proj")}
        if i >= cfg.num_layers:
            names |= {p + n for n in ("enorm.weight", "hnorm.weight", "eh_proj.weight", "final_layernorm.weight")}
    return names


def assert_same_state(a: MoECausalLM, b: MoECausalLM):
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for name in sa:
        assert torch.equal(sa[name], sb[name]), name


def test_checkpoint_round_trip_is_bit_identical(tmp_path):
    model = routed_model()
    save_hf_checkpoint(model, tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.json", "model.safetensors"]
    loaded = load_hf_checkpoint(tmp_path).eval()
    assert loaded.cfg == model.cfg
    assert_same_state(model, loaded)
    tokens = torch.randint(0, 20, (3, 12))
    with torch.no_grad():
        assert torch.equal(model(tokens), loaded(tokens))
        hidden, _ = model.hidden_states(tokens)
        for ours, theirs in zip(model.mtp_logits(hidden, tokens), loaded.mtp_logits(hidden, tokens)):
            assert torch.equal(ours, theirs)


def test_safetensors_holds_exactly_the_bailing_moe_v2_names_and_layouts(tmp_path):
    model = routed_model()
    cfg, D = model.cfg, model.cfg.hidden_size
    save_hf_checkpoint(model, tmp_path)
    with safe_open(tmp_path / "model.safetensors", framework="pt") as f:
        saved = {name: f.get_tensor(name) for name in f.keys()}
    assert set(saved) == expected_hf_names(cfg)
    for name in ["model.word_embeddings.weight", "model.layers.0.mlp.gate_proj.weight",
                 "model.layers.1.attention.query_key_value.weight", "model.layers.2.mlp.gate.expert_bias",
                 "model.layers.2.mlp.experts.7.down_proj.weight", "model.layers.3.eh_proj.weight"]:
        assert name in saved

    attn, moe, mtp = model.blocks[1].attn, model.blocks[2].ffn, model.mtp[0]
    qkv = saved["model.layers.1.attention.query_key_value.weight"]
    assert qkv.shape == ((4 + 2 * 2) * 24, D)  # query heads, then key heads, then value heads
    assert torch.equal(qkv, torch.cat([attn.q_proj.weight, attn.k_proj.weight, attn.v_proj.weight]))
    assert torch.equal(saved["model.layers.2.mlp.experts.5.up_proj.weight"], moe.up_proj[5])
    assert torch.equal(saved["model.layers.2.mlp.gate.weight"], moe.router)
    assert torch.equal(saved["model.layers.2.mlp.gate.expert_bias"], moe.expert_bias)
    # both read [embedding, hidden], so eh_proj keeps its layout
    assert torch.equal(saved["model.layers.3.eh_proj.weight"], mtp.eh_proj.weight)
    assert torch.equal(saved["model.layers.3.enorm.weight"], mtp.embed_norm.weight)
    assert torch.equal(saved["model.layers.3.mlp.experts.0.gate_proj.weight"], mtp.block.ffn.gate_proj[0])


def test_config_json_round_trips_and_names_bailing_moe_v2_keys(tmp_path):
    cfg = routed_model().cfg
    written = json.loads(json.dumps(hf_config(cfg)))
    assert model_config_from_hf(written) == cfg
    assert written["architectures"] == ["BailingMoeV2ForCausalLM"]
    assert written["model_type"] == "bailing_moe_v2" and written["score_function"] == "sigmoid"
    assert (written["num_hidden_layers"], written["first_k_dense_replace"], written["head_dim"]) == (3, 1, 24)
    assert (written["n_group"], written["topk_group"], written["routed_scaling_factor"]) == (4, 2, 2.5)
    assert (written["num_experts"], written["num_experts_per_tok"], written["num_shared_experts"]) == (8, 2, 1)
    assert (written["partial_rotary_factor"], written["rope_theta"]) == (0.5, 600000.0)
    assert written["num_nextn_predict_layers"] == 1 and written["use_qk_norm"] is True

    foreign = {k: v for k, v in written.items() if k != "ringrl"}
    assert model_config_from_hf(foreign).preset == "hf"
    with pytest.raises(ValueError, match="score_function"):
        model_config_from_hf(written | {"score_function": "softmax"})


def test_config_json_carries_every_model_config_field():
    """A field added to ModelConfig but not to config.json would fail here, not silently reset."""
    shifted = {int: lambda v: v + 1, float: lambda v: v * 1.5 + 0.25, str: lambda v: v + "-x"}
    cfg = ModelConfig(**{f.name: shifted[f.type](getattr(ModelConfig(), f.name)) for f in fields(ModelConfig)})
    assert model_config_from_hf(json.loads(json.dumps(hf_config(cfg)))) == cfg


def test_sharded_save_round_trips(tmp_path):
    model = routed_model()
    max_shard_bytes = 40_000
    save_hf_checkpoint(model, tmp_path, max_shard_bytes=max_shard_bytes)
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    files = sorted(set(index["weight_map"].values()))
    assert len(files) > 2 and not (tmp_path / "model.safetensors").exists()
    assert set(index["weight_map"]) == expected_hf_names(model.cfg)
    state = load_hf_state_dict(tmp_path)
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in state.values())
    for file in files:
        with safe_open(tmp_path / file, framework="pt") as f:
            sizes = [f.get_tensor(n).numel() * 4 for n in f.keys()]
        assert sum(sizes) <= max_shard_bytes or len(sizes) == 1
    loaded = load_hf_checkpoint(tmp_path)
    assert loaded.cfg == model.cfg
    assert_same_state(model, loaded)

    save_hf_checkpoint(model, tmp_path)  # an unsharded save over it leaves no stale shard
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.json", "model.safetensors"]


def glm4_moe_reference(model: MoECausalLM):
    """transformers' Glm4MoeForCausalLM with our weights, mapped from the BailingMoeV2 names."""
    transformers = pytest.importorskip("transformers", reason="transformers (the reference) is not installed")
    cfg = model.cfg
    config = transformers.Glm4MoeConfig(
        vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size, intermediate_size=cfg.dense_ffn_size,
        num_hidden_layers=cfg.num_layers, num_attention_heads=cfg.num_heads,
        num_key_value_heads=cfg.num_kv_heads, head_dim=cfg.head_dim, max_position_embeddings=cfg.max_seq_len,
        rms_norm_eps=cfg.norm_eps, rope_parameters={"rope_type": "default", "rope_theta": cfg.rope_base,
                                                    "partial_rotary_factor": cfg.rotary_fraction},
        moe_intermediate_size=cfg.expert_ffn_size, num_experts_per_tok=cfg.top_k,
        n_shared_experts=cfg.num_shared_experts, n_routed_experts=cfg.num_experts,
        routed_scaling_factor=cfg.routed_scaling_factor, n_group=cfg.num_expert_groups,
        topk_group=cfg.topk_groups, first_k_dense_replace=cfg.first_k_dense, norm_topk_prob=True,
        use_qk_norm=True, num_mtp_layers=0, tie_word_embeddings=False)
    reference = transformers.Glm4MoeForCausalLM._from_config(
        config, attn_implementation="eager", experts_implementation="eager")
    reference.load_state_dict(bailing_to_glm4_moe(to_hf_state_dict(model), cfg), strict=True)
    return reference.eval()


def bailing_to_glm4_moe(hf: dict, cfg: ModelConfig) -> dict:
    """BailingMoeV2 names -> Glm4Moe names: split q/k/v, fuse each expert's gate and up rows."""
    renames = {"attention.dense.": "self_attn.o_proj.", "attention.query_layernorm.": "self_attn.q_norm.",
               "attention.key_layernorm.": "self_attn.k_norm.", "gate.expert_bias": "gate.e_score_correction_bias",
               "model.word_embeddings.": "model.embed_tokens."}
    glm = {}
    for name, tensor in hf.items():
        if ".mlp.experts." in name:
            continue
        if name.endswith("query_key_value.weight"):
            p = name.removesuffix("attention.query_key_value.weight") + "self_attn."
            sizes = [cfg.num_heads * cfg.head_dim] + [cfg.num_kv_heads * cfg.head_dim] * 2
            glm |= dict(zip([p + "q_proj.weight", p + "k_proj.weight", p + "v_proj.weight"], tensor.split(sizes)))
            continue
        for old, new in renames.items():
            name = name.replace(old, new)
        glm[name] = tensor
    for i in range(cfg.first_k_dense, cfg.num_layers):
        p, E = f"model.layers.{i}.mlp.experts.", range(cfg.num_experts)
        glm[p + "gate_up_proj"] = torch.stack(
            [torch.cat([hf[f"{p}{e}.gate_proj.weight"], hf[f"{p}{e}.up_proj.weight"]]) for e in E])
        glm[p + "down_proj"] = torch.stack([hf[f"{p}{e}.down_proj.weight"] for e in E])
    return glm


def test_logits_match_transformers_glm4_moe():
    model = routed_model(num_mtp_layers=0)
    reference = glm4_moe_reference(model)
    tokens = torch.randint(0, model.cfg.vocab_size, (4, 24), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ours, theirs = model(tokens), reference(tokens).logits
    unbiased = routed_model(num_mtp_layers=0)
    for moe in unbiased.moe_layers():
        moe.expert_bias.zero_()
    with torch.no_grad():
        assert (unbiased(tokens) - ours).abs().max() > 1e-3  # the expert bias does change routing here
    assert ours.dtype == theirs.dtype == torch.float32
    assert (ours - theirs).abs().max() <= 1e-5
