"""A run's checkpoint: what ``Distiller`` writes so that a run resumes where it stopped.

checkpoint.safetensors (written atomically) holds every trainable parameter (student, its
projection head if any, the generator's trainable layers) and both optimizers' states; its
metadata holds the loop's state as JSON: counters, the replay buffer, the corpus cursor, the
data RNG, the current round's step metrics and the JSONL offsets (samples and metrics written
after the checkpoint are moved aside on resume, so a resumed run equals a straight one). The
teacher's logits and features on the buffer's texts are saved beside the weights, for the same
reason.

Integrity: the metadata carries a SHA-256 of the tensors and the state, checked on load. The
checkpoint a save replaces is kept as checkpoint.prev.safetensors, so a corrupted file costs one
save, not the run.
"""
import hashlib
import json
import logging
import os
import shutil
from pathlib import Path

import mindspore as ms
import numpy as np

from kernels.gumbel_noise import derive_seed
from .models.checkpoint_io import CheckpointError, load_safetensors, safetensors_metadata, save_safetensors
from .run_files import rewind_shards

log = logging.getLogger("ms_dfkd")

CKPT_NAME = "checkpoint.safetensors"
PREV_NAME = "checkpoint.prev.safetensors"

# Settings a resumed run may change: they extend the run or change how it is evaluated and reported,
# not what it computes. Any other change is refused.
RESUMABLE_CHANGES = ("run.rounds", "run.eval_every", "run.eval_examples", "run.show_samples", "run.teacher_test",
                     "run.checkpoint_every", "run.checkpoint_seconds", "run.threads")


def trainable_arrays(d):
    """{prefix/name: array} of what trains in distiller d, optimizer states included."""
    arrays = {}
    for name, p in d.student_loss.parameters_and_names():
        arrays["student/" + name] = p.asnumpy()
    net_ids = {id(p) for p in d.student_loss.get_parameters()}
    for name, p in d.opt_s.parameters_and_names():
        if id(p) not in net_ids:
            arrays["opt_s/" + name] = p.asnumpy()
    if d.method == "dfkd-t3":
        for name, p in d.generator.parameters_and_names():
            if p.requires_grad:
                arrays["generator/" + name] = p.asnumpy()
        all_gen = {id(p) for p in d.generator.get_parameters()}
        if d.label_vectors is not None:
            arrays["label_vectors/weight"] = d.label_vectors.asnumpy()
            all_gen.add(id(d.label_vectors))
        for name, p in d.opt_g.parameters_and_names():
            if id(p) not in all_gen:
                arrays["opt_g/" + name] = p.asnumpy()
    return arrays


def digest(arrays, state_json):
    """SHA-256 of the tensors (name, dtype, size, bytes, in name order) and the state JSON. The size, not
    the shape: safetensors gives a 0-d scalar back with shape (1,)."""
    h = hashlib.sha256()
    for k in sorted(arrays):
        a = np.ascontiguousarray(arrays[k])
        h.update(f"{k}|{a.dtype.str}|{a.size}|".encode())
        h.update(a.reshape(-1).view(np.uint8))  # the array's own buffer: tobytes() copied 292 MB a save
    h.update(state_json.encode())
    return h.hexdigest()


def save(d):
    """Write d's checkpoint (rank 0 only; every rank holds the same weights), keeping the one it replaces.
    The file is written now; its flush to disk and the renames finish on a background thread. Returns a
    function that waits for them (CheckpointWriteError if they failed), or None on other ranks."""
    if not d.is_main:
        return None
    state = {"counters": d.counters, "replay": d.replay.state_dict(),
             "corpus": d.corpus_sampler.state_dict() if d.corpus_sampler else None,
             "warmup_corpus": d.warmup_sampler.state_dict() if d.warmup_sampler else None,
             "data_rng": d.data_rng.bit_generator.state, "ahead": d.ahead,
             "texts_offset": d.texts_out.offset, "metrics_offset": d.metrics_out.offset,
             "history": d.history, "method": d.method, "world_size": d.world, "acc": d.acc}
    # the teacher's outputs on the buffer are saved, not recomputed on resume: computed again in
    # other batches, a row's logits can differ in the last bit, and a resumed run would drift
    replay = {"replay/" + k: v for k, v in d.replay.teacher_arrays().items()}
    arrays = {**trainable_arrays(d), **replay}
    state_json = json.dumps(state)
    path = d.out / CKPT_NAME

    def keep_previous():
        if path.exists():
            _keep_previous(path, d.out / PREV_NAME)
    return save_safetensors(arrays, path, metadata={"format": "ms-dfkd-run", "state": state_json,
                                                   "sha256": digest(arrays, state_json)},
                            before_replace=keep_previous, finish_later=True)


def _keep_previous(path, prev):
    """prev <- path, atomically, before path is replaced (a hard link: no copy, the same inode)."""
    tmp = prev.with_name(f".{prev.name}.tmp")
    if tmp.exists():
        tmp.unlink()
    try:
        os.link(path, tmp)
    except OSError:  # a filesystem without hard links
        shutil.copy2(path, tmp)
    os.replace(tmp, prev)


def compare_resume_config(cfg, out):
    """{key: (saved, now)} of the settings that differ from the run folder's config.yaml and may change on
    resume (RESUMABLE_CHANGES, and the results section, which runs do not read). ConfigError listing the
    others. Keys that config.yaml lacks (written by an older version) are not compared."""
    import yaml
    from .config import ConfigError
    path = Path(out) / "config.yaml"
    if not path.is_file():
        return {}
    saved = yaml.safe_load(path.read_text()) or {}
    now = cfg.to_dict()
    changes, refused = {}, []
    for sec, body in now.items():
        for key, value in body.items():
            old = (saved.get(sec) or {}).get(key, value)
            if old == value:
                continue
            name = f"{sec}.{key}"
            changes[name] = (old, value)
            # run.out_dir: the folder was moved or copied, or its template written otherwise
            if name not in RESUMABLE_CHANGES and sec != "results" and name != "run.out_dir":
                refused.append(f"{name} {old!r} -> {value!r}")
    if refused:
        raise ConfigError(f"{out} holds a run made with other settings: refusing to resume with "
                          + "; ".join(refused) + f". Only {', '.join(RESUMABLE_CHANGES)} may change on resume; "
                          "use another --run.out_dir for a different run")
    return changes


def _read_verified(path):
    """(trainable arrays, the teacher's outputs on the replay buffer, state) of a run checkpoint whose
    checksum matches; CheckpointError otherwise."""
    arrays = load_safetensors(path)
    teacher_out = {k.split("/", 1)[1]: arrays.pop(k) for k in [k for k in arrays if k.startswith("replay/")]}
    meta = safetensors_metadata(path)
    if meta.get("format") != "ms-dfkd-run" or "state" not in meta:
        raise CheckpointError(f"{path} is not an ms-dfkd run checkpoint")
    if "sha256" in meta and digest({**arrays, **{"replay/" + k: v for k, v in teacher_out.items()}},
                                   meta["state"]) != meta["sha256"]:
        prev = path.with_name(PREV_NAME)
        back = (f"the previous checkpoint is {prev}: move it to {path} to resume from one save earlier"
                if prev.exists() else "no previous checkpoint is kept in this folder")
        raise CheckpointError(f"{path} is corrupted: its data does not match the checksum written with it; {back}")
    return arrays, teacher_out, json.loads(meta["state"])


def load_generator_from(d, run_dir):
    """Set d's generator (its trainable layers and label vectors) to those of another dfkd-t3 run whose
    generator phase is finished (run.generator_from). Returns that phase's number of generator steps."""
    import yaml
    run_dir = Path(run_dir)
    path = run_dir / CKPT_NAME
    if not path.is_file():
        raise FileNotFoundError(f"run.generator_from: {path} not found (name a dfkd-t3 run folder)")
    arrays, _, state = _read_verified(path)
    if state["method"] != "dfkd-t3":
        raise CheckpointError(f"run.generator_from: {run_dir} is a {state['method']!r} run; it needs a dfkd-t3 run")
    saved = yaml.safe_load((run_dir / "config.yaml").read_text()) if (run_dir / "config.yaml").is_file() else {}
    src_run = (saved or {}).get("run") or {}
    planned, done = int(src_run.get("gen_warmup_steps", 0)), int(state["counters"].get("warmup_steps", 0))
    if src_run.get("schedule") != "two_phase" or planned == 0 or done < planned:
        raise CheckpointError(f"run.generator_from: {run_dir} has no finished generator phase (schedule "
                              f"{src_run.get('schedule')!r}, {done} of {planned} run.gen_warmup_steps done); "
                              f"finish it first")
    parts = ("generator/", "label_vectors/")
    want = {k: v for k, v in trainable_arrays(d).items() if k.startswith(parts)}
    have = {k: v for k, v in arrays.items() if k.startswith(parts)}
    bad = sorted(set(want) ^ set(have)) + [k for k in want if k in have and want[k].size != have[k].size]
    if bad:
        raise CheckpointError(f"run.generator_from: {run_dir}'s generator does not fit this run's (generator.arch, "
                              f".trainable, .top_k_layers and .label_vectors must match): {bad[:6]}")
    params = dict(d.generator.parameters_and_names())
    for key, arr in have.items():
        p = d.label_vectors if key.startswith("label_vectors/") else params[key.split("/", 1)[1]]
        p.set_data(ms.Tensor(arr.reshape(p.shape), dtype=p.dtype))
    return done


def load(d):
    """Restore d from its checkpoint; CheckpointError names what does not match."""
    path = d.out / CKPT_NAME
    arrays, teacher_out, state = _read_verified(path)
    if state["method"] != d.method:
        raise CheckpointError(f"{path} belongs to a {state['method']!r} run, not {d.method!r}; "
                              f"use another run.out_dir")
    expected = trainable_arrays(d)
    missing = sorted(set(expected) - set(arrays))
    unexpected = sorted(set(arrays) - set(expected))
    # safetensors stores 0-d scalars (learning rate, step) as shape (1,): compare sizes
    bad = [f"{k}: {arrays[k].shape} vs {expected[k].shape}" for k in expected
           if k in arrays and arrays[k].size != expected[k].size]
    if missing or unexpected or bad:
        raise CheckpointError(f"cannot resume from {path}: missing {missing[:10]}, unexpected "
                              f"{unexpected[:10]}, shape mismatches {bad[:10]}")
    cells = {"student": d.student_loss, "opt_s": d.opt_s}
    if d.method == "dfkd-t3":
        cells.update(generator=d.generator, opt_g=d.opt_g)
    params = {pre: dict(c.parameters_and_names()) for pre, c in cells.items()}
    if d.method == "dfkd-t3" and d.label_vectors is not None:
        params["label_vectors"] = {"weight": d.label_vectors}
    for key, arr in arrays.items():
        pre, name = key.split("/", 1)
        p = params[pre][name]
        p.set_data(ms.Tensor(arr.reshape(p.shape), dtype=p.dtype))
    d.counters = state["counters"]
    d.history = state["history"]
    if "acc" in state:
        d.acc = state["acc"]
    records = state["replay"]["records"]
    if records and not teacher_out:  # a checkpoint from before the teacher outputs were saved
        log.info(f"{path} has no saved teacher outputs: computing them for the {len(records)} replay records")
        lo, fe = d.teacher_run.logits([r["text"] for r in records], with_features=True)
        teacher_out = {"teacher_logits": lo, "teacher_features": fe}
    try:
        d.replay.load_state_dict(state["replay"], teacher_out.get("teacher_logits"),
                                 teacher_out.get("teacher_features"))
    except ValueError as e:
        raise CheckpointError(f"{path}: {e}") from None
    if d.corpus_sampler is not None and state["corpus"] is not None:
        d.corpus_sampler.load_state_dict(state["corpus"])
    if d.warmup_sampler is not None and state.get("warmup_corpus") is not None:
        d.warmup_sampler.load_state_dict(state["warmup_corpus"])
    d.data_rng.bit_generator.state = state["data_rng"]
    d.ahead, d.ahead_batch = state.get("ahead"), None  # a batch drawn ahead is sampled again when needed
    if d.rank > 0:
        # the samplers saved are rank 0's: reseed this rank's own streams so that ranks keep
        # drawing different batches (the replay records themselves are rank 0's until refilled)
        step = d.counters["gen_steps"]
        d.replay.rng = np.random.default_rng(derive_seed(d.cfg.run.seed, d.rank, 7, step))
        d.data_rng = np.random.default_rng(derive_seed(d.cfg.run.seed, d.rank, 11, step))
    tag = f"after-step{d.counters['gen_steps']}"
    if d.world == 1 and state.get("world_size", 1) == 1:
        side = d.texts_out.rewind(state["texts_offset"], tag)
        if side:
            log.warning(f"samples written after the checkpoint were moved to {side}")
    else:
        rewind_shards(d.out, d.counters["gen_steps"], tag, d.rank, d.world)
    if d.is_main:
        d.metrics_out.rewind(state["metrics_offset"], tag)
    if d.method == "dfkd-t3":
        d.refresh_tables()


def dump_parameters(d, path=None):
    """Write this rank's trainable parameters and optimizer states (to check that ranks agree)."""
    path = Path(path or d.out / f"params.rank{d.rank}.safetensors")
    save_safetensors(trainable_arrays(d), path, metadata={"format": "ms-dfkd-rank-params", "rank": str(d.rank),
                                                          "world_size": str(d.world)})
    return path
