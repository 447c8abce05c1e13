"""Placement: each actor's device, the weight path for every combination of devices, the GPU
settings refused before any actor starts, and the CPU cores each actor is bound to."""
import json
import os
import subprocess
import sys

import pytest
import torch

from comm.placement import (SHARED, Placement, cast_parameters, compute_dtype, core_plan, place,
                            weight_path, wire_dtype)
from conf.load import ConfigError, load_config, resolve_gpus
from tests.conftest import REPO_ROOT
from tests.test_model import tiny_model

CPU = Placement("node-a", "cpu")


def gpu(index: int, node: str = "node-a", cupy: bool = False) -> Placement:
    return Placement(node, "cuda", str(index), has_cupy=cupy)


@pytest.mark.parametrize("publisher, subscribers, path", [
    (CPU, [CPU, CPU], "gloo"),                               # cpu + cpu
    (gpu(0), [gpu(0), gpu(0)], "cuda-ipc"),                  # cuda + cuda, one shared GPU
    (gpu(0), [gpu(1), gpu(2)], "nccl"),                      # cuda + cuda, a GPU each
    (gpu(0), [gpu(0, "node-b")], "nccl"),                    # GPU 0 of two nodes: distinct GPUs
    (gpu(0, cupy=True), [gpu(1, cupy=True)], "cupy-nccl"),   # ... and cupy on every rank
    (gpu(0, cupy=True), [gpu(1)], "nccl"),                   # cupy missing on one rank
    (gpu(0), [CPU], "gloo"),                                 # cuda learner + cpu generator
    (CPU, [gpu(0)], "gloo"),                                 # cpu learner + cuda generator
    (gpu(0), [gpu(0), gpu(1)], "gloo"),                      # some share a GPU, some do not
])
def test_weight_path_follows_where_the_ranks_are(publisher, subscribers, path):
    chosen, why = weight_path(publisher, subscribers)
    assert chosen == path and why


def test_weights_travel_in_what_the_generators_compute_in():
    assert wire_dtype([gpu(0), gpu(1)]) == torch.bfloat16
    assert wire_dtype([CPU]) == torch.float32
    assert wire_dtype([gpu(0), CPU]) == torch.float32
    assert compute_dtype(gpu(0)) == torch.bfloat16 and compute_dtype(CPU) == torch.float32


def test_actor_device_from_its_setting_and_its_grant():
    assert place("generator-0", "auto", "n", [], cuda_usable=False, has_cupy=False) == Placement("n", "cpu")
    assert place("generator-0", "cpu", "n", ["3"], cuda_usable=True, has_cupy=True) == Placement("n", "cpu")
    on_gpu = place("learner-0", "auto", "n", ["3"], cuda_usable=True, has_cupy=True)
    assert on_gpu == Placement("n", "cuda", "3", True) and on_gpu.torch_device() == torch.device("cuda", 0)
    with pytest.raises(RuntimeError, match=r"learner-0.device=cuda but Ray granted this actor no GPU"):
        place("learner-0", "cuda", "n", [], cuda_usable=False, has_cupy=False)
    with pytest.raises(RuntimeError, match=r"generator-1 was granted GPU 3 but this torch build cannot use CUDA"):
        place("generator-1", "auto", "n", ["3"], cuda_usable=False, has_cupy=False)


@pytest.mark.parametrize("cores, generators, plan", [
    ({0, 1}, {"generator-0": 1}, {"generator-0": {0}, SHARED: {1}}),
    ({4, 9, 2, 7}, {"generator-0": 1, "generator-1": 2}, {"generator-0": {2}, "generator-1": {4, 7}, SHARED: {9}}),
    (set(range(16)), {"generator-0": 2}, {"generator-0": {0, 1}, SHARED: set(range(2, 16))}),
    ({0, 1}, {"generator-0": 1, "generator-1": 1}, None),  # nothing left for the learner and the judges
    ({0, 1}, {"generator-0": 2}, None),
])
def test_each_cpu_generator_gets_cores_of_its_own_and_the_rest_share_the_others(cores, generators, plan):
    assert core_plan(cores, generators) == plan


BINDING_SCRIPT = """
import json, os, sys, threading
from comm.placement import bind_threads
stop, later = threading.Event(), []
early = threading.Thread(target=stop.wait)
early.start()
bound = bind_threads([int(sys.argv[1])])
late = threading.Thread(target=lambda: later.append(sorted(os.sched_getaffinity(0))))
late.start()
late.join()
print(json.dumps({"bound": bound, "early": sorted(os.sched_getaffinity(early.native_id)), "later": later[0]}))
stop.set()
"""


@pytest.mark.skipif(not hasattr(os, "sched_setaffinity") or len(os.sched_getaffinity(0)) < 2,
                    reason="needs Linux and 2 cores")
def test_binding_reaches_the_threads_a_process_has_and_those_it_starts_later():
    core = max(os.sched_getaffinity(0))
    out = subprocess.run([sys.executable, "-c", BINDING_SCRIPT, str(core)], cwd=REPO_ROOT, capture_output=True,
                         text=True, check=True)
    assert json.loads(out.stdout) == {"bound": [core], "early": [core], "later": [core]}


def test_inference_cast_keeps_buffers_float32():
    model = cast_parameters(tiny_model(), torch.bfloat16)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    assert {b.dtype for b in model.buffers()} == {torch.float32}  # expert bias and RoPE frequencies


@pytest.mark.parametrize("overrides, message", [
    (["generator.device=gpu"], "generator.device ('gpu') must be one of ('auto', 'cpu', 'cuda')"),
    (["learner.device=cpu", "learner.num_gpus=1"], "learner.device=cpu holds no GPU (learner.num_gpus 1.0)"),
    (["generator.device=cuda", "generator.num_gpus=0"], "generator.device=cuda needs generator.num_gpus > 0"),
    (["learner.num_gpus=2"], "learner.num_gpus (2.0) must be within 0..1 (an actor uses one device) or -1 (auto)"),
    (["learner.num=2", "learner.num_gpus=0.5"],
     "learner.num (2) CUDA learners need a whole GPU each (learner.num_gpus 0.5): their FSDP group is NCCL, "
     "one rank per GPU"),
])
def test_device_settings_that_cannot_work_are_refused_at_load(overrides, message):
    with pytest.raises(ConfigError) as refused:
        load_config(overrides)
    assert str(refused.value) == message


@pytest.mark.parametrize("overrides, cluster_gpus, learner_gpus, generator_gpus", [
    ([], 0, 0.0, 0.0),                                        # CPU machine: everything on CPU
    ([], 1, 0.5, 0.5),                                        # one GPU: generator and learner share it
    (["generator.num=3"], 8, 1.0, 1.0),                       # enough GPUs: one each
    (["generator.num=3"], 2, 0.5, 0.5),                       # 4 GPU actors on 2 GPUs: two per GPU
    (["generator.device=cpu"], 1, 1.0, 0.0),                  # only the learner wants a GPU
    (["generator.num_gpus=0.25"], 1, 0.5, 0.25),              # an explicit share is kept
])
def test_auto_gpus_from_the_cluster(overrides, cluster_gpus, learner_gpus, generator_gpus):
    cfg = load_config(overrides)
    resolve_gpus(cfg, cluster_gpus)
    assert (cfg.learner.num_gpus, cfg.generator.num_gpus) == (learner_gpus, generator_gpus)


@pytest.mark.parametrize("overrides, cluster_gpus, message", [
    (["generator.device=cuda"], 0, "generator.device=cuda but the Ray cluster has no GPU"),
    (["learner.num=2"], 1, "learner.num (2) CUDA learners need a whole GPU each, the cluster has 1 GPUs for 3 GPU "
                           "actors: add GPUs or set learner.device=cpu"),
    (["generator.num=2", "generator.num_gpus=1"], 2,
     "the actors ask for 2.5 GPUs (learner.num 1 x 0.5, generator.num 2 x 1), the Ray cluster has 2"),
])
def test_gpu_settings_the_cluster_cannot_hold_are_refused(overrides, cluster_gpus, message):
    cfg = load_config(overrides)
    with pytest.raises(ConfigError) as refused:
        resolve_gpus(cfg, cluster_gpus)
    assert str(refused.value) == message


def test_cuda_on_a_cluster_without_gpus_exits_before_any_actor_starts(tmp_path):
    result = subprocess.run([sys.executable, "run.py", "generator.device=cuda", "ray.dashboard=false",
                             f"run.out_dir={tmp_path}"], cwd=REPO_ROOT, capture_output=True, text=True, timeout=180)
    assert result.returncode == 2
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert lines[-1] == "config error: generator.device=cuda but the Ray cluster has no GPU"
    assert "placed on" not in result.stdout + result.stderr  # no actor came up
