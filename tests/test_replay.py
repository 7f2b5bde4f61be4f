"""ReplayBuffer: records and the teacher's outputs on them stay row-aligned through eviction,
sampling and a checkpoint round trip (checked against a plain list of (record, logits, features))."""
import json

import numpy as np
import pytest

from ms_dfkd.replay import ReplayBuffer


def _batch(start, n, rng):
    recs = [{"text": f"t{i}", "target": i % 2} for i in range(start, start + n)]
    return recs, rng.normal(size=(n, 2)).astype(np.float32), rng.normal(size=(n, 3)).astype(np.float32)


def test_eviction_and_sampling_keep_rows_aligned():
    rng = np.random.default_rng(0)
    buf, ref = ReplayBuffer(5, seed=3), []
    for start, n in [(0, 3), (3, 4), (7, 1), (8, 6)]:  # the last batch alone overflows the capacity
        recs, lo, fe = _batch(start, n, rng)
        buf.add(recs, lo, fe)
        ref = (ref + list(zip(recs, lo, fe)))[-5:]
        assert [r["text"] for r in buf.records] == [r["text"] for r, _, _ in ref]
        np.testing.assert_array_equal(buf.teacher_logits, np.stack([l for _, l, _ in ref]))
        np.testing.assert_array_equal(buf.teacher_features, np.stack([f for _, _, f in ref]))
    idx = np.random.default_rng(3).integers(0, 5, size=7)  # the buffer's own RNG, seeded 3
    recs, lo, fe = buf.sample(7)
    assert [r["text"] for r in recs] == [ref[i][0]["text"] for i in idx]
    np.testing.assert_array_equal(lo, np.stack([ref[i][1] for i in idx]))
    np.testing.assert_array_equal(fe, np.stack([ref[i][2] for i in idx]))


def test_state_round_trip_draws_the_same_batches():
    rng = np.random.default_rng(1)
    buf = ReplayBuffer(4, seed=9)
    buf.add(*_batch(0, 6, rng))
    state = json.loads(json.dumps(buf.state_dict()))  # the checkpoint keeps it as JSON
    arrays = buf.teacher_arrays()
    other = ReplayBuffer(4, seed=123)
    other.load_state_dict(state, arrays["teacher_logits"], arrays["teacher_features"])
    for _ in range(3):
        (r1, l1, f1), (r2, l2, f2) = buf.sample(5), other.sample(5)
        assert r1 == r2
        np.testing.assert_array_equal(l1, l2)
        np.testing.assert_array_equal(f1, f2)


def test_empty_buffer_round_trip_then_add():
    buf = ReplayBuffer(4, seed=0)
    assert buf.teacher_arrays() == {}
    other = ReplayBuffer(4, seed=0)
    other.load_state_dict(json.loads(json.dumps(buf.state_dict())))  # a checkpoint from a warm-up
    recs, lo, fe = _batch(0, 2, np.random.default_rng(2))
    other.add(recs, lo, fe)
    np.testing.assert_array_equal(other.teacher_logits, lo)


def test_errors_name_the_mismatch():
    with pytest.raises(ValueError, match="capacity must be > 0, got 0"):
        ReplayBuffer(0, seed=0)
    buf = ReplayBuffer(4, seed=0)
    with pytest.raises(RuntimeError, match="empty"):
        buf.sample(1)
    recs, lo, fe = _batch(0, 3, np.random.default_rng(0))
    with pytest.raises(ValueError, match="3 records with 2 teacher logit rows and 3 feature rows"):
        buf.add(recs, lo[:2], fe)
    buf.add(recs, lo, fe)
    with pytest.raises(ValueError, match="3 records with no teacher logit rows"):
        ReplayBuffer(4, seed=0).load_state_dict(buf.state_dict())
    empty = ReplayBuffer(4, seed=0).state_dict()
    with pytest.raises(ValueError, match="0 records with 3 teacher logit rows and 3 feature rows"):
        ReplayBuffer(4, seed=0).load_state_dict(empty, lo, fe)  # arrays for records the state lacks
