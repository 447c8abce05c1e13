"""bf16 inference and bf16-autocast training against their float32 / full-forward references.

Bounds (stated in the README): a log-prob from KV-cache decoding differs from a full forward of
the same bf16 model by at most DECODE_MAX_ABS (mean at most DECODE_MEAN_ABS); an RL step's loss
under bf16 autocast on CUDA differs from float32 on CPU by at most LOSS_ABS. Measured on CPU bf16
(the CUDA bound's proxy): 0.010 max, 8.3e-4 mean; loss 5.9e-4 on the batch below.
"""
import pytest
import torch

from comm.placement import cast_parameters
from conf.schema import AlgoConfig, LearnerConfig
from learner.batch import collate
from learner.trainer import Trainer
from model.engine import GenerationEngine, generate
from model.moe import MoECausalLM
from tests.test_model import tiny_model
from tests.test_sharding import MODEL, make_groups

DECODE_MAX_ABS = 0.05
DECODE_MEAN_ABS = 5e-3
LOSS_ABS = 2e-3

on_cuda = pytest.param("cuda", marks=[pytest.mark.gpu, pytest.mark.skipif(
    torch.cuda.device_count() < 1, reason="needs a CUDA device")])


def full_forward_logprobs(model, rollout) -> torch.Tensor:
    tokens = torch.tensor([rollout.prompt_tokens + rollout.completion_tokens], device=model.embed.weight.device)
    with torch.no_grad():
        logprobs = torch.log_softmax(model(tokens)[0].float(), dim=-1)
    P, C = len(rollout.prompt_tokens), len(rollout.completion_tokens)
    targets = torch.tensor(rollout.completion_tokens, device=logprobs.device)
    return logprobs[P - 1 : P - 1 + C].gather(1, targets[:, None])[:, 0].cpu()


@pytest.mark.parametrize("device", ["cpu", on_cuda])
def test_bf16_kv_cache_decode_matches_full_forward(device):
    model = cast_parameters(tiny_model(), torch.bfloat16).to(device).eval()
    engine = GenerationEngine(model, max_slots=8, max_len=48, eos_id=-1, pad_id=0, max_new_tokens=20,
                              temperature=1.0, seed=1)
    assert engine.cache.keys.dtype == torch.bfloat16 and engine.cache.keys.device.type == device
    rollouts = generate(engine, [(f"p{i}", [1, 5 + i % 7, 6, 7, 3 + i % 5]) for i in range(8)])
    errors = torch.cat([(full_forward_logprobs(model, r) - torch.tensor(r.behavior_logprobs)).abs()
                        for r in rollouts])
    assert errors.max() <= DECODE_MAX_ABS and errors.mean() <= DECODE_MEAN_ABS, (errors.max(), errors.mean())


def trainer_on(device: str) -> Trainer:
    torch.manual_seed(0)
    return Trainer(MoECausalLM(MODEL).to(device), LearnerConfig(lr=1e-2), AlgoConfig(), temperature=1.0)


def rl_step_on(device: str) -> dict:
    return trainer_on(device).rl_step(collate(make_groups(0), pad_id=0).to(torch.device(device)))


def test_rl_loss_under_cpu_bf16_autocast_matches_float32():
    """The model under autocast (what the learner does on CUDA), with CPU autocast as its proxy here."""
    batch = collate(make_groups(0), pad_id=0)
    reference, _ = trainer_on("cpu").rl_loss(batch)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        autocast, stats = trainer_on("cpu").rl_loss(batch)
    assert autocast.dtype == torch.float32 and abs(autocast.item() - reference.item()) <= LOSS_ABS
    autocast.backward()


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 1, reason="needs a CUDA device")
def test_rl_step_on_cuda_matches_cpu():
    cpu, cuda = rl_step_on("cpu"), rl_step_on("cuda")
    assert abs(cuda["loss"] - cpu["loss"]) <= LOSS_ABS, (cuda["loss"], cpu["loss"])
    assert abs(cuda["mismatch_kl"] - cpu["mismatch_kl"]) <= 10 * LOSS_ABS
    assert cuda["trained_tokens"] == cpu["trained_tokens"]


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 1, reason="needs a CUDA device")
def test_checkpoint_written_on_cuda_loads_on_cpu(tmp_path):
    on_cuda = trainer_on("cuda")
    on_cuda.rl_step(collate(make_groups(0), pad_id=0).to(torch.device("cuda")))
    on_cuda.save(tmp_path / "model")
    on_cpu = trainer_on("cpu")
    on_cpu.load(tmp_path / "model")
    assert on_cpu.version == 1
    for (name, saved), (_, loaded) in zip(on_cuda.model.state_dict().items(), on_cpu.model.state_dict().items()):
        assert torch.equal(saved.cpu(), loaded), name
