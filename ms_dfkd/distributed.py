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
  merges the shards; run_files.py).
"""
import logging
import os

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
