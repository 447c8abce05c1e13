"""The wire schema: round trip of a group, and rejection of each kind of malformed message."""
import random

import msgpack
import numpy as np
import pytest

from comm.wire import SCHEMA_VERSION, Trajectory, WireError, decode_group, encode_group


def make_trajectory(group: int, completion_length: int, routed: bool = False) -> Trajectory:
    """A trajectory whose every field holds a distinct, checkable value."""
    rng = np.random.default_rng(group)
    return Trajectory(
        uid=f"p7-g{group}-r0",
        prompt_uid="p7",
        group=group,
        round=group + 2,
        prompt_tokens=np.arange(5, dtype=np.int32) + 100,
        completion_tokens=rng.integers(0, 50_000, completion_length, dtype=np.int32),
        behavior_logprobs=-rng.random(completion_length, dtype=np.float32),
        policy_version=np.repeat(np.int32([3, 4]), [completion_length // 2, completion_length - completion_length // 2]),
        finish_reason="stop" if group % 2 == 0 else "length",
        task_meta={"answer": "85", "difficulty": 2, "weight": 0.5, "synthetic": True},
        reward=float(group) / 2,
        judge={"reason": "ok", "seconds": 0.001},
        timings={"generate": 1.25, "judge": 0.01},
        # one row per position fed to the model: 5 prompt tokens + all completion tokens but the last
        routed_experts=rng.integers(0, 8, (5 + completion_length - 1, 2, 3), dtype=np.uint8) if routed else None,
    )


def make_group() -> list[Trajectory]:
    return [make_trajectory(0, 6, routed=True), make_trajectory(1, 9), make_trajectory(2, 0)]


def header_of(frames) -> dict:
    return msgpack.unpackb(frames[0], raw=False)


def with_header(frames, header: dict) -> list:
    return [msgpack.packb(header, use_bin_type=True), *frames[1:]]


def assert_rejected(frames, reason: str) -> None:
    with pytest.raises(WireError) as caught:
        decode_group(frames)
    assert caught.value.reason == reason, str(caught.value)


def test_round_trip_keeps_every_field_and_dtype():
    sent = make_group()
    frames = [bytes(frame) for frame in encode_group(sent)]
    received = decode_group(frames)
    assert len(received) == len(sent)
    for got, want in zip(received, sent):
        for name in ("uid", "prompt_uid", "group", "round", "finish_reason", "task_meta", "reward", "judge", "timings"):
            assert getattr(got, name) == getattr(want, name), name
        for name in ("prompt_tokens", "completion_tokens", "behavior_logprobs", "policy_version"):
            assert getattr(got, name).dtype == getattr(want, name).dtype, name
            np.testing.assert_array_equal(getattr(got, name), getattr(want, name))
        assert got.num_completion_tokens == want.num_completion_tokens
    assert received[0].routed_experts.dtype == np.uint8
    np.testing.assert_array_equal(received[0].routed_experts, sent[0].routed_experts)
    assert received[1].routed_experts is None
    assert received[2].num_completion_tokens == 0


def test_frames_are_views_of_the_arrays_and_header_has_no_element_lists():
    sent = make_group()
    frames = encode_group(sent)
    assert len(frames) == 1 + 5 + 4 + 4
    first_tokens = frames[header_of(frames)["trajectories"][0]["arrays"]["completion_tokens"][0]]
    assert np.shares_memory(np.frombuffer(first_tokens, dtype=np.int32), sent[0].completion_tokens)
    header = header_of(frames)
    assert header["v"] == SCHEMA_VERSION and header["kind"] == "group"
    for record in header["trajectories"]:
        for index, dtype, shape in record["arrays"].values():
            assert isinstance(index, int) and isinstance(dtype, str)
            assert all(isinstance(dim, int) for dim in shape)
        scalar_values = [v for k, v in record.items() if k != "arrays"]
        assert not any(isinstance(v, list) for v in scalar_values)
    assert header["trajectories"][1]["arrays"]["completion_tokens"][1:] == ["<i4", [9]]


def test_garbage_is_not_msgpack():
    assert_rejected([b"\xc1 definitely not a header"], "not_msgpack")
    assert_rejected([], "truncated")


def test_unknown_version_and_wrong_kind():
    frames = encode_group(make_group())
    assert_rejected(with_header(frames, {**header_of(frames), "v": SCHEMA_VERSION + 1}), "unknown_version")
    assert_rejected(with_header(frames, {**header_of(frames), "kind": "weights"}), "wrong_kind")


def test_truncated_array_frame():
    frames = encode_group(make_group())
    index = header_of(frames)["trajectories"][1]["arrays"]["behavior_logprobs"][0]
    frames[index] = bytes(frames[index])[:-3]
    assert_rejected(frames, "truncated")


def test_shape_that_does_not_match_the_bytes():
    frames = encode_group(make_group())
    header = header_of(frames)
    header["trajectories"][1]["arrays"]["prompt_tokens"][2] = [4]  # 5 tokens on the wire
    assert_rejected(with_header(frames, header), "bad_shape")
    header["trajectories"][1]["arrays"]["prompt_tokens"][2] = [5, 1]  # wrong number of dims
    assert_rejected(with_header(frames, header), "bad_shape")


def test_disallowed_dtype():
    frames = encode_group(make_group())
    header = header_of(frames)
    header["trajectories"][0]["arrays"]["behavior_logprobs"][1] = "<f8"
    assert_rejected(with_header(frames, header), "bad_dtype")
    header["trajectories"][0]["arrays"]["behavior_logprobs"][1] = "|O"
    assert_rejected(with_header(frames, header), "bad_dtype")


def test_missing_field():
    frames = encode_group(make_group())
    header = header_of(frames)
    del header["trajectories"][2]["finish_reason"]
    assert_rejected(with_header(frames, header), "missing_field")
    header = header_of(frames)
    del header["trajectories"][0]["arrays"]["policy_version"]
    assert_rejected(with_header(frames, header), "missing_field")


def test_mismatched_completion_lengths():
    frames = encode_group(make_group())
    header = header_of(frames)
    index = header["trajectories"][1]["arrays"]["policy_version"][0]
    header["trajectories"][1]["arrays"]["policy_version"][2] = [8]
    frames[index] = bytes(frames[index])[:8 * 4]
    assert_rejected(with_header(frames, header), "length_mismatch")


def test_bad_finish_reason_frame_index_and_field_types():
    frames = encode_group(make_group())
    header = header_of(frames)
    header["trajectories"][0]["finish_reason"] = "crashed"
    assert_rejected(with_header(frames, header), "bad_finish_reason")
    header = header_of(frames)
    header["trajectories"][0]["arrays"]["prompt_tokens"][0] = len(frames)
    assert_rejected(with_header(frames, header), "bad_frame_index")
    header = header_of(frames)
    header["trajectories"][0]["group"] = "zero"
    assert_rejected(with_header(frames, header), "bad_field")
    header = header_of(frames)
    header["trajectories"][0]["round"] = -1
    assert_rejected(with_header(frames, header), "bad_field")
    assert_rejected(frames + [b"stray"], "bad_frame_index")


def test_encode_rejects_what_decode_would():
    trajectory = make_trajectory(0, 4)
    trajectory.completion_tokens = trajectory.completion_tokens.astype(np.int64)
    with pytest.raises(WireError, match="bad_dtype"):
        encode_group([trajectory])
    with pytest.raises(WireError, match="mixed_group"):
        other_prompt = make_trajectory(1, 4)
        other_prompt.prompt_uid = "p8"
        encode_group([make_trajectory(0, 4), other_prompt])


def test_random_corruption_only_ever_raises_wire_error():
    frames = [bytes(frame) for frame in encode_group(make_group())]
    rng = random.Random(0)
    for _ in range(2000):
        corrupted = list(frames)
        header = bytearray(corrupted[0])
        for _ in range(rng.randint(1, 4)):
            header[rng.randrange(len(header))] = rng.randrange(256)
        corrupted[0] = bytes(header)
        try:
            decode_group(corrupted)
        except WireError:
            pass


def test_routing_rows_must_cover_the_fed_positions():
    trajectory = make_trajectory(0, 6, routed=True)
    trajectory.routed_experts = trajectory.routed_experts[:-1]
    with pytest.raises(WireError) as err:
        encode_group([trajectory])
    assert err.value.reason == "length_mismatch"
