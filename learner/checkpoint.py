"""Sharded checkpoints with torch.distributed.checkpoint: model, optimizer and trainer state.

Every learner rank writes its own shard into one directory; loading works for the
same number of ranks or a different one (DCP reshards). With one learner and no
process group it is the same call on one process.
"""
from pathlib import Path

import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict


def save_checkpoint(directory: Path, model, optimizer, trainer_state: dict) -> None:
    model_state, optim_state = get_state_dict(model, optimizer)
    dcp.save({"model": model_state, "optim": optim_state, "trainer": trainer_state},
             checkpoint_id=str(directory))


def load_checkpoint(directory: Path, model, optimizer, trainer_state: dict) -> dict:
    """Load into `model` and `optimizer` in place; returns the saved trainer state."""
    model_state, optim_state = get_state_dict(model, optimizer)
    state = {"model": model_state, "optim": optim_state, "trainer": dict(trainer_state)}
    dcp.load(state, checkpoint_id=str(directory))
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])
    return state["trainer"]
