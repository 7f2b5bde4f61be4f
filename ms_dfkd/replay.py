"""Replay buffer of generated samples: what the student steps draw from."""
import numpy as np


class ReplayBuffer:
    """The most recent ``capacity`` samples: their records (text, target label, teacher
    probabilities, round) and, row for row, the teacher's logits and features on them.

    The teacher is frozen, so the outputs of the forward that labelled a sample serve every student
    step that draws it: a student step runs no teacher (that forward was half of its time on CPU).
    Student steps draw batches with the buffer's own seeded RNG, whose state is part of the
    checkpoint so that a resumed run draws the same batches.
    """

    def __init__(self, capacity, seed):
        if capacity <= 0:
            raise ValueError(f"replay buffer capacity must be > 0, got {capacity}")
        self.capacity = int(capacity)
        self.records = []
        self.teacher_logits = self.teacher_features = None  # (len(records), ...) once filled
        self.rng = np.random.default_rng(seed)

    def __len__(self):
        return len(self.records)

    def add(self, records, teacher_logits, teacher_features):
        """Append records with the teacher's outputs on them (one row each); drop the oldest beyond capacity."""
        _check_rows(len(records), teacher_logits, teacher_features)
        lo, fe = np.asarray(teacher_logits), np.asarray(teacher_features)
        self.records.extend(records)
        if self.teacher_logits is not None:
            lo, fe = np.concatenate([self.teacher_logits, lo]), np.concatenate([self.teacher_features, fe])
        keep = max(len(self.records) - self.capacity, 0)
        self.records = self.records[keep:]
        self.teacher_logits, self.teacher_features = lo[keep:], fe[keep:]

    def sample(self, n):
        """n records drawn with replacement, and the teacher's logits and features on them."""
        if not self.records:
            raise RuntimeError("replay buffer is empty: no samples were generated before the student step")
        idx = self.rng.integers(0, len(self.records), size=n)
        return [self.records[i] for i in idx], self.teacher_logits[idx], self.teacher_features[idx]

    def state_dict(self):
        """JSON-able state; the teacher's outputs are arrays and go beside it (``teacher_arrays``)."""
        return {"capacity": self.capacity, "records": self.records, "rng": self.rng.bit_generator.state}

    def teacher_arrays(self):
        return {} if not self.records else {"teacher_logits": self.teacher_logits,
                                            "teacher_features": self.teacher_features}

    def load_state_dict(self, state, teacher_logits=None, teacher_features=None):
        """Restore from state_dict() and the teacher's outputs on its records (None when it is empty)."""
        n = len(state["records"])
        if n or teacher_logits is not None or teacher_features is not None:
            _check_rows(n, teacher_logits, teacher_features)
        self.capacity = int(state["capacity"])
        self.records = list(state["records"])
        self.teacher_logits = np.asarray(teacher_logits) if n else None
        self.teacher_features = np.asarray(teacher_features) if n else None
        self.rng.bit_generator.state = state["rng"]


def _check_rows(n, teacher_logits, teacher_features):
    """ValueError unless the teacher's logits and features have one row per record, n each."""
    rows = ["no" if a is None else len(a) for a in (teacher_logits, teacher_features)]
    if not rows[0] == rows[1] == n:
        raise ValueError(f"replay buffer: {n} records with {rows[0]} teacher logit rows "
                         f"and {rows[1]} feature rows")
