"""Data-parallel runs under MindSpore's launcher (msrun) and collectives (HCCL, NCCL, CPU TCP).

Nothing here launches processes or moves tensors between them: ``msrun`` starts one
process per device (scripts/run_distributed.sh), ``mindspore.communication.init``
joins them, and ``nn.DistributedGradReducer`` averages the gradients of the generator
and student steps. What the driver does per rank (train.py):

* model init is the same on every rank (run.seed), so averaged gradients keep the
  parameters identical;
* every rank draws its own corpus shard and its own Gumbel noise (seeds include the rank);
* rank 0 writes the checkpoint, metrics.jsonl and the progress bar; every rank appends
  its samples to its own shard generated.rank{r}.jsonl (``read_jsonl`` of a run folder
  merges the shards).
"""
import json
import logging
import os
from pathlib import Path

log = logging.getLogger("ms_dfkd")

# msrun exports MS_ROLE to the processes it starts: MS_SCHED for the scheduler (it runs the
# same command; init() makes it serve the cluster and exit) and MS_WORKER for the ranks.
MSRUN_ROLES = ("MS_SCHED", "MS_WORKER")


def launched_by_msrun():
    return os.environ.get("MS_ROLE") in MSRUN_ROLES


def init_data_parallel():
    """Join the msrun cluster; returns (rank, world_size)."""
    import mindspore as ms
    from mindspore.communication import get_group_size, get_rank, init
    init()  # the scheduler process never returns from here
    ms.set_auto_parallel_context(parallel_mode=ms.ParallelMode.DATA_PARALLEL, gradients_mean=True)
    rank, world = get_rank(), get_group_size()
    log.info(f"data parallel: rank {rank} of {world} (pid {os.getpid()})")
    return rank, world


def grad_reducer_factory(world_size):
    """params -> a reducer that averages a gradient tuple over all ranks (Distiller's hook)."""
    from mindspore import nn

    def make(params):
        return nn.DistributedGradReducer(params, mean=True, degree=world_size)
    return make


def ranks_agree(values):
    """True on every rank if every rank passed the same small non-negative integers.

    One MindSpore AllReduce: each rank puts its values in its own row of a zero matrix and the sum
    gathers every row (CPU collectives only reduce by sum); float32 is exact below 2**24.
    """
    import mindspore as ms
    import numpy as np
    from mindspore import ops
    from mindspore.communication import get_group_size, get_rank
    rows = np.zeros((get_group_size(), len(values)), np.float32)
    rows[get_rank()] = values
    rows = ops.AllReduce(ops.ReduceOp.SUM)(ms.Tensor(rows)).asnumpy()
    return bool((rows == rows[0]).all())


def shard_name(rank, world_size):
    """The JSONL file a rank appends its samples to (a single process keeps the plain name)."""
    return f"generated.rank{rank}.jsonl" if world_size > 1 else "generated.jsonl"


def rewind_shards(out_dir, step, tag, rank, world_size):
    """Move the samples written after a checkpoint (generator step >= ``step``) to side files.

    The checkpoint records only rank 0's byte offset, and the shards of different ranks
    have different lengths, so the cut is found from the records' own "step" field.
    Each rank cuts its own shard; rank 0 also cuts the shards that no current rank owns
    (an earlier run with more ranks, or a single-process run resumed on several).
    Returns the side files written.
    """
    from .replay import JsonlWriter
    out_dir = Path(out_dir)
    own = out_dir / shard_name(rank, world_size)
    paths = [own]
    if rank == 0:
        current = {shard_name(r, world_size) for r in range(world_size)}
        paths += [p for p in sorted(out_dir.glob("generated*.jsonl")) if p.name not in current]
    sides = []
    for p in paths:
        if not p.exists():
            continue
        side = JsonlWriter(p).rewind(_offset_of_step(p, step), tag)
        if side:
            log.warning(f"samples written after the checkpoint were moved to {side}")
            sides.append(side)
    return sides


def _offset_of_step(path, step):
    """Byte offset of the first record with record["step"] >= step (the file size if none)."""
    offset = 0
    with open(path, "rb") as f:
        for line in f:
            try:
                rec_step = json.loads(line).get("step")
            except (json.JSONDecodeError, AttributeError):
                rec_step = None  # a torn last line from a killed rank: it goes to the side file
                if not line.endswith(b"\n"):
                    return offset
            if rec_step is not None and rec_step >= step:
                return offset
            offset += len(line)
    return offset


def dump_parameters(distiller, path=None):
    """Write this rank's trainable parameters and optimizer states (to check that ranks agree)."""
    from .models.checkpoint_io import save_safetensors
    from .run_checkpoint import trainable_arrays
    path = Path(path or distiller.out / f"params.rank{distiller.rank}.safetensors")
    save_safetensors(trainable_arrays(distiller), path,
                     metadata={"format": "ms-dfkd-rank-params", "rank": str(distiller.rank),
                               "world_size": str(distiller.world)})
    return path
