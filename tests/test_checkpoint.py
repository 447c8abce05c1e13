"""Checkpoints are published only when complete; a truncated or corrupted one is refused for the previous."""
from pathlib import Path

import pytest
import torch

from learner.checkpoint import (CheckpointError, latest_valid, load_checkpoint, publish, published, save_checkpoint,
                                staging_dir, write_durably)


def write(run_dir: Path, step: int, value: float) -> Path:
    model = torch.nn.Linear(64, 64)
    torch.nn.init.constant_(model.weight, value)
    optimizer = torch.optim.AdamW(model.parameters())
    staged = staging_dir(run_dir, step)
    save_checkpoint(staged / "model", model, optimizer, {"version": step})
    write_durably(staged / "driver.json", b'{"step": %d}' % step)
    return publish(staged)


def read_weight(checkpoint: Path) -> float:
    model = torch.nn.Linear(64, 64)
    trainer = load_checkpoint(checkpoint / "model", model, torch.optim.AdamW(model.parameters()), {"version": 0})
    assert trainer["version"] == int(checkpoint.name.split("-")[1])
    return model.weight[0, 0].item()


def test_the_newest_complete_checkpoint_is_used_and_old_ones_are_pruned(tmp_path):
    for step in (2, 4, 6):
        write(tmp_path, step, float(step))
    assert [p.name for p in published(tmp_path / "checkpoints")] == ["step-000004", "step-000006"]
    staging_dir(tmp_path, 8)  # a checkpoint being written when the driver died: never published
    assert read_weight(latest_valid(tmp_path, warn=pytest.fail)) == 6.0


@pytest.mark.parametrize("damage", ["truncate", "flip", "delete"])
def test_a_damaged_checkpoint_is_refused_in_one_line_and_the_previous_one_used(tmp_path, damage):
    write(tmp_path, 2, 2.0)
    newest = write(tmp_path, 4, 4.0)
    shard = next((newest / "model").glob("*.distcp"))
    data = shard.read_bytes()
    if damage == "truncate":
        shard.write_bytes(data[: len(data) // 2])
    elif damage == "flip":
        shard.write_bytes(data[:100] + bytes([data[100] ^ 1]) + data[101:])
    else:
        shard.unlink()
    warnings = []
    assert read_weight(latest_valid(tmp_path, warn=warnings.append)) == 2.0
    assert len(warnings) == 1 and "\n" not in warnings[0]
    assert "step-000004" in warnings[0] and shard.name in warnings[0] and "falling back" in warnings[0]


def test_no_usable_checkpoint_is_a_clear_error(tmp_path):
    newest = write(tmp_path, 2, 2.0)
    (newest / "MANIFEST.json").unlink()
    with pytest.raises(CheckpointError, match="no usable checkpoint"):
        latest_valid(tmp_path, warn=lambda line: None)
