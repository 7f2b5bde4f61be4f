"""MindSpore's runtime on the CPU device target, set up once per process before its first op runs.

``configure_runtime(threads)`` does two things there (and nothing on other device targets):

- **Graphs run without a busy-waiting caller.** By default MindSpore hands each graph (and each eager
  op) to a queue worker thread, and the thread that asked for a result waits for that queue in a loop
  that never sleeps: on a 2-core machine it holds one core of the two for as long as the graph runs,
  and MindSpore's own kernels get the other. With ``MS_DEV_HOST_BLOCKING_RUN=1`` the calling thread
  hands the graph to the kernel threads itself and sleeps until it is done; a BERT student step then
  took about 0.6 of the time (docs/BENCHMARKS.md). MindSpore reads the variable once, at its first op,
  so this must run before any MindSpore op; a value already in the environment (``0`` brings the queue
  back) is kept.
- **Threads.** MindSpore's CPU kernel pool and the C++ kernels of kernels/ take ``threads`` threads, or,
  with 0, as many as the cores this process may use (MindSpore's own default of 25 oversubscribes a
  small machine).

Not for other device targets: there the queue lets the host prepare the next kernels while the device
runs, and nothing here is changed.
"""
import logging
import os

log = logging.getLogger("ms_dfkd")

BLOCKING_RUN_ENV = "MS_DEV_HOST_BLOCKING_RUN"


def configure_runtime(threads=0):
    """Set up MindSpore on the CPU device target (see the module docstring) and return the thread count;
    None on other device targets. Call it after the device target is chosen, before the first op."""
    import mindspore as ms
    if ms.get_context("device_target") != "CPU":
        return None
    os.environ.setdefault(BLOCKING_RUN_ENV, "1")
    if os.environ[BLOCKING_RUN_ENV] != "1":
        log.info(f"{BLOCKING_RUN_ENV}={os.environ[BLOCKING_RUN_ENV]}: MindSpore's queue thread runs the graphs "
                 f"and the caller busy-waits for it, which takes a core")
    n = int(threads or 0) or len(os.sched_getaffinity(0))
    from kernels import set_cpu_threads  # the C++ kernels of the encoder ops: as many threads
    set_cpu_threads(n)
    try:
        ms.device_context.cpu.op_tuning.threads_num(n)
    except RuntimeError:  # MindSpore takes it once per process (tests call the command line many times)
        pass
    log.debug(f"MindSpore CPU kernels: {n} threads; {BLOCKING_RUN_ENV}={os.environ[BLOCKING_RUN_ENV]}")
    return n
