"""The wire schema: one GRPO group of trajectories per message, typed and versioned.

A message is a list of ZeroMQ multipart frames:

    frame 0   msgpack header {"v": SCHEMA_VERSION, "kind": "group", "trajectories": [record, ...]}
              where each record holds the scalar fields of one Trajectory plus
              "arrays": {name: [frame_index, dtype_str, shape]}
    frame 1.. one frame per array: its raw little-endian bytes

Arrays never become per-element msgpack lists. `encode_group` hands out views of the
numpy buffers (a copy only for a non-contiguous array); `decode_group` wraps the received
frames with `np.frombuffer`, so decoded arrays are views of the frames (read-only when the
frames are `bytes`).

`decode_group` checks everything it reads and raises `WireError(reason)` on any defect; it
never returns a partly valid group. `encode_group` applies the same checks before sending,
so a bad trajectory fails in the process that built it.
"""
from dataclasses import dataclass, field
from math import prod

import msgpack
import numpy as np

SCHEMA_VERSION = 2  # 2: `round`
GROUP_KIND = "group"
FINISH_REASONS = ("stop", "length", "aborted")
TASK_META_VALUE_TYPES = (str, int, float, bool)


class WireError(ValueError):
    """A message or trajectory that breaks the schema; `reason` is a short machine label."""

    def __init__(self, reason: str, detail: str):
        super().__init__(f"{reason}: {detail}")
        self.reason = reason


@dataclass(frozen=True)
class ArraySpec:
    """What one array field may hold on the wire."""

    dtypes: tuple[str, ...]  # allowed numpy dtype strings, little-endian
    ndim: int
    per_token: bool  # first dimension equals the completion length
    optional: bool = False


ARRAY_SPECS = {
    "prompt_tokens": ArraySpec(("<i4",), ndim=1, per_token=False),
    "completion_tokens": ArraySpec(("<i4",), ndim=1, per_token=True),
    "behavior_logprobs": ArraySpec(("<f4",), ndim=1, per_token=True),
    "policy_version": ArraySpec(("<i4",), ndim=1, per_token=True),
    "routed_experts": ArraySpec(("|u1", "<i2"), ndim=3, per_token=False, optional=True),
}
SCALAR_FIELDS = ("uid", "prompt_uid", "group", "round", "finish_reason", "task_meta", "reward", "judge", "timings")
RECORD_FIELDS = frozenset(SCALAR_FIELDS) | {"arrays"}


@dataclass
class Trajectory:
    """One sampled completion of a prompt: the unit the generator, judges and learner exchange."""

    uid: str  # unique, stable across retries
    prompt_uid: str
    group: int  # index of this completion within its GRPO group (0..G-1)
    prompt_tokens: np.ndarray  # int32 [P]
    completion_tokens: np.ndarray  # int32 [C]
    behavior_logprobs: np.ndarray  # float32 [C], log-prob the generator sampled each token with
    policy_version: np.ndarray  # int32 [C], weight version each token was generated under
    finish_reason: str  # "stop" | "length" | "aborted"
    task_meta: dict = field(default_factory=dict)  # from the prompt, e.g. {"answer": "85"}
    reward: float | None = None  # filled by a judge
    judge: dict = field(default_factory=dict)  # judge metadata, msgpack-able values
    timings: dict = field(default_factory=dict)  # name -> seconds
    # uint8 | int16 [P + C - 1, n_moe_layers, top_k]: the experts each input position was routed
    # to, for every position the generator fed through the model (prompt and all but the last token)
    routed_experts: np.ndarray | None = None
    # C3PO++: the round during which the generator sent the group (rounds it had closed by then; 0
    # when rounds are off). A round's training batch is every group sent in it and before.
    round: int = 0

    @property
    def num_completion_tokens(self) -> int:
        return len(self.completion_tokens)

    def validate(self) -> None:
        """Raise WireError if any field breaks the schema."""
        _check_scalars(self)
        _check_arrays(self)


def encode_group(trajectories: list[Trajectory]) -> list[bytes | memoryview]:
    """Frames of one message carrying a GRPO group; array frames are views, not copies."""
    _check_group(trajectories)
    frames: list[bytes | memoryview] = [b""]
    records = [_encode_record(trajectory, frames) for trajectory in trajectories]
    header = {"v": SCHEMA_VERSION, "kind": GROUP_KIND, "trajectories": records}
    try:
        frames[0] = msgpack.packb(header, use_bin_type=True)
    except (TypeError, ValueError, OverflowError) as error:
        raise WireError("bad_field", f"header is not msgpack-able: {error}") from None
    return frames


def decode_group(frames: list[bytes | memoryview]) -> list[Trajectory]:
    """The group carried by `frames`; raises WireError naming the first defect found."""
    records = _decode_header(frames)
    used_frames: set[int] = set()
    trajectories = [_decode_record(record, frames, used_frames) for record in records]
    if len(used_frames) != len(frames) - 1:
        raise WireError("bad_frame_index", f"{len(frames) - 1 - len(used_frames)} array frames not referenced")
    _check_group(trajectories)
    return trajectories


def _encode_record(trajectory: Trajectory, frames: list) -> dict:
    arrays = {}
    for name in ARRAY_SPECS:
        array = getattr(trajectory, name)
        if array is None:
            continue
        arrays[name] = [len(frames), array.dtype.str, list(array.shape)]
        frames.append(memoryview(np.ascontiguousarray(array).reshape(-1)).cast("B"))
    record = {name: getattr(trajectory, name) for name in SCALAR_FIELDS}
    record["reward"] = None if trajectory.reward is None else float(trajectory.reward)
    record["timings"] = {name: float(seconds) for name, seconds in trajectory.timings.items()}
    record["arrays"] = arrays
    return record


def _decode_header(frames: list) -> list:
    if not frames:
        raise WireError("truncated", "message has no frames")
    try:
        header = msgpack.unpackb(frames[0], raw=False)
    except (ValueError, TypeError, msgpack.UnpackException) as error:
        raise WireError("not_msgpack", f"header frame: {error}") from None
    if not isinstance(header, dict):
        raise WireError("bad_header", f"header is a {type(header).__name__}, not a map")
    if header.get("v") != SCHEMA_VERSION:
        raise WireError("unknown_version", f"schema version {header.get('v')!r}, expected {SCHEMA_VERSION}")
    if header.get("kind") != GROUP_KIND:
        raise WireError("wrong_kind", f"message kind {header.get('kind')!r}, expected {GROUP_KIND!r}")
    records = header.get("trajectories")
    if not isinstance(records, list):
        raise WireError("missing_field", "header has no trajectories list")
    return records


def _decode_record(record, frames: list, used_frames: set[int]) -> Trajectory:
    if not isinstance(record, dict):
        raise WireError("bad_field", "trajectory record is not a map")
    _check_keys(record, required=RECORD_FIELDS, allowed=RECORD_FIELDS, what="trajectory")
    array_entries = record["arrays"]
    if not isinstance(array_entries, dict):
        raise WireError("bad_field", "arrays is not a map")
    required_arrays = {name for name, spec in ARRAY_SPECS.items() if not spec.optional}
    _check_keys(array_entries, required=required_arrays, allowed=ARRAY_SPECS.keys(), what="arrays")
    arrays = {name: _decode_array(name, entry, frames, used_frames) for name, entry in array_entries.items()}
    scalars = {name: record[name] for name in SCALAR_FIELDS}
    return Trajectory(**scalars, **arrays)


def _decode_array(name: str, entry, frames: list, used_frames: set[int]) -> np.ndarray:
    if not (isinstance(entry, list) and len(entry) == 3):
        raise WireError("bad_field", f"{name}: array entry must be [frame_index, dtype, shape]")
    index, dtype_str, shape = entry
    if not _is_int(index) or not 1 <= index < len(frames) or index in used_frames:
        raise WireError("bad_frame_index", f"{name}: frame index {index!r} of {len(frames)} frames")
    used_frames.add(index)
    spec = ARRAY_SPECS[name]
    if dtype_str not in spec.dtypes:
        raise WireError("bad_dtype", f"{name}: dtype {dtype_str!r} not in {spec.dtypes}")
    if not (isinstance(shape, list) and len(shape) == spec.ndim and all(_is_int(d) and d >= 0 for d in shape)):
        raise WireError("bad_shape", f"{name}: shape {shape!r} is not {spec.ndim} non-negative ints")
    buffer = memoryview(frames[index]).cast("B")
    dtype = np.dtype(dtype_str)
    expected_bytes = prod(shape) * dtype.itemsize
    if buffer.nbytes < expected_bytes:
        raise WireError("truncated", f"{name}: {buffer.nbytes} bytes, shape {shape} needs {expected_bytes}")
    if buffer.nbytes > expected_bytes:
        raise WireError("bad_shape", f"{name}: {buffer.nbytes} bytes, shape {shape} holds {expected_bytes}")
    return np.frombuffer(buffer, dtype=dtype).reshape(shape)


def _check_group(trajectories: list[Trajectory]) -> None:
    if not trajectories:
        raise WireError("empty_group", "a group needs at least one trajectory")
    for trajectory in trajectories:
        trajectory.validate()
    prompt_uids = {trajectory.prompt_uid for trajectory in trajectories}
    if len(prompt_uids) != 1:
        raise WireError("mixed_group", f"one group per message, got prompt_uids {sorted(prompt_uids)}")


def _check_scalars(trajectory: Trajectory) -> None:
    for name in ("uid", "prompt_uid", "finish_reason"):
        _require(isinstance(getattr(trajectory, name), str), name, "a str")
    _require(_is_int(trajectory.group) and trajectory.group >= 0, "group", "a non-negative int")
    _require(_is_int(trajectory.round) and trajectory.round >= 0, "round", "a non-negative int")
    if trajectory.finish_reason not in FINISH_REASONS:
        raise WireError("bad_finish_reason", f"{trajectory.finish_reason!r} not in {FINISH_REASONS}")
    _require(trajectory.reward is None or _is_real(trajectory.reward), "reward", "None or a number")
    _require(_is_str_map(trajectory.task_meta, lambda v: isinstance(v, TASK_META_VALUE_TYPES)),
             "task_meta", "a map of str to str/int/float/bool")
    _require(_is_str_map(trajectory.judge, lambda v: True), "judge", "a map with str keys")
    _require(_is_str_map(trajectory.timings, _is_real), "timings", "a map of str to seconds")


def _check_arrays(trajectory: Trajectory) -> None:
    completion_length = None
    for name, spec in ARRAY_SPECS.items():
        array = getattr(trajectory, name)
        if array is None and spec.optional:
            continue
        if not isinstance(array, np.ndarray):
            raise WireError("missing_field", f"{name} is {type(array).__name__}, not a numpy array")
        if array.dtype.str not in spec.dtypes:
            raise WireError("bad_dtype", f"{name}: dtype {array.dtype.str!r} not in {spec.dtypes}")
        if array.ndim != spec.ndim:
            raise WireError("bad_shape", f"{name}: {array.ndim} dims, expected {spec.ndim}")
        if spec.per_token:
            completion_length = array.shape[0] if completion_length is None else completion_length
            if array.shape[0] != completion_length:
                raise WireError("length_mismatch",
                                f"{name} has {array.shape[0]} tokens, completion has {completion_length}")
    _check_routing_rows(trajectory)


def _check_routing_rows(trajectory: Trajectory) -> None:
    if trajectory.routed_experts is None:
        return
    fed = len(trajectory.prompt_tokens) + len(trajectory.completion_tokens) - 1
    if trajectory.routed_experts.shape[0] != fed:
        raise WireError("length_mismatch", f"routed_experts has {trajectory.routed_experts.shape[0]} rows, "
                                           f"the sequence fed {fed} positions")


def _check_keys(mapping: dict, required, allowed, what: str) -> None:
    missing = set(required) - mapping.keys()
    if missing:
        raise WireError("missing_field", f"{what} lacks {sorted(missing)}")
    unknown = mapping.keys() - set(allowed)
    if unknown:
        raise WireError("unknown_field", f"{what} has unknown {sorted(map(str, unknown))}")


def _require(condition: bool, name: str, expected: str) -> None:
    if not condition:
        raise WireError("bad_field", f"{name} must be {expected}")


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_real(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _is_str_map(value, value_ok) -> bool:
    return isinstance(value, dict) and all(isinstance(k, str) and value_ok(v) for k, v in value.items())
