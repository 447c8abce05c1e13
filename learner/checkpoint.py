"""Checkpoints: sharded model and optimizer state (torch.distributed.checkpoint), published atomically.

Every learner rank writes its own shard into one directory; loading works for the same
number of ranks or a different one (DCP reshards). With one learner and no process group
it is the same call on one process.

A run's checkpoints live in `<run dir>/checkpoints/step-NNNNNN/`. One is written into
`step-NNNNNN.partial/` first; when every shard and state file is durable (fsynced), the
driver writes `MANIFEST.json` (size and sha256 of every file) and renames the folder into
place. Loading takes the newest published checkpoint whose files all match their manifest;
a truncated or corrupted one is refused with one line naming the file, and the one before
it is used.
"""
import hashlib
import json
import os
import shutil
from pathlib import Path

import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

MANIFEST = "MANIFEST.json"
PARTIAL = ".partial"
KEEP = 2  # published checkpoints kept per run (the newest and one to fall back to)


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be used; the message is one line naming the checkpoint and why."""


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


def write_durably(path: Path, payload: bytes) -> None:
    """Write and fsync, so the bytes survive the process (and the machine) going away."""
    with open(path, "wb") as file:
        file.write(payload)
        file.flush()
        os.fsync(file.fileno())


def staging_dir(run_dir: Path, step: int) -> Path:
    """A fresh `.partial` folder for the checkpoint after `step`."""
    staged = run_dir / "checkpoints" / f"step-{step:06d}{PARTIAL}"
    shutil.rmtree(staged, ignore_errors=True)
    staged.mkdir(parents=True)
    return staged


def publish(staged: Path) -> Path:
    """Seal a fully written `.partial` folder with its manifest and move it into place."""
    files = sorted(p for p in staged.rglob("*") if p.is_file())
    for path in files:
        _fsync(path)
    manifest = {str(p.relative_to(staged)): {"bytes": p.stat().st_size, "sha256": _sha256(p)} for p in files}
    write_durably(staged / MANIFEST, json.dumps(manifest, indent=1).encode())
    final = staged.with_name(staged.name.removesuffix(PARTIAL))
    shutil.rmtree(final, ignore_errors=True)
    os.replace(staged, final)
    _fsync(final.parent)
    for old in published(final.parent)[:-KEEP]:
        shutil.rmtree(old)
    return final


def published(checkpoints_dir: Path) -> list[Path]:
    """Published checkpoints, oldest first."""
    if not checkpoints_dir.is_dir():
        return []
    return sorted(p for p in checkpoints_dir.glob("step-*") if p.is_dir() and not p.name.endswith(PARTIAL))


def verify(checkpoint: Path) -> None:
    """Raise CheckpointError unless every file of the manifest is there, whole and unchanged."""
    manifest_path = checkpoint / MANIFEST
    if not manifest_path.is_file():
        raise CheckpointError(f"checkpoint {checkpoint} has no {MANIFEST}: it was never completed")
    for name, expected in json.loads(manifest_path.read_text()).items():
        path = checkpoint / name
        if not path.is_file():
            raise CheckpointError(f"checkpoint {checkpoint}: {name} is missing")
        size = path.stat().st_size
        if size != expected["bytes"]:
            raise CheckpointError(f"checkpoint {checkpoint}: {name} is {size} bytes, "
                                  f"the manifest says {expected['bytes']} (truncated?)")
        if _sha256(path) != expected["sha256"]:
            raise CheckpointError(f"checkpoint {checkpoint}: {name} does not match its sha256 (corrupted)")


def latest_valid(run_dir: Path, warn) -> Path:
    """The newest published checkpoint that verifies; each refused one is reported with `warn(line)`."""
    candidates = published(run_dir / "checkpoints")
    for checkpoint in reversed(candidates):
        try:
            verify(checkpoint)
            return checkpoint
        except CheckpointError as err:
            warn(f"{err}; falling back to the previous checkpoint")
    raise CheckpointError(f"no usable checkpoint in {run_dir / 'checkpoints'} "
                          f"({len(candidates)} published, none verified)")


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        while chunk := file.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
