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

``restart_with_huge_pages()`` (the command line calls it first): glibc's malloc hands out memory in 4 KB
pages that the kernel faults in one at a time, and a dfkd-t3 job of the README's first command took 1.5
million such faults (numpy's and MindSpore's buffers, freed and allocated again every step). With
``GLIBC_TUNABLES=glibc.malloc.hugetlb=1`` malloc asks for transparent huge pages (2 MB; where the system
leaves them to the program, its "madvise" setting): 0.14 million faults, and the compiling first round
about 10% shorter. glibc reads the variable at start-up only, so the process starts itself again, once,
with it added. ``MS_DFKD_HUGE_PAGES=0`` keeps the process as it is.
"""
import logging
import os
import platform
import sys

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


HUGE_PAGES_TUNABLE = "glibc.malloc.hugetlb=1"
HUGE_PAGES_ENV = "MS_DFKD_HUGE_PAGES"
THP_SETTING = "/sys/kernel/mm/transparent_hugepage/enabled"


def huge_pages_usable():
    """Whether malloc's huge pages can work here: Linux with glibc, transparent huge pages not "never"."""
    if not sys.platform.startswith("linux") or platform.libc_ver()[0] != "glibc":
        return False
    try:
        with open(THP_SETTING) as f:
            return "[never]" not in f.read()
    except OSError:
        return False


def restart_with_huge_pages():
    """Start this program again with GLIBC_TUNABLES asking glibc's malloc for transparent huge pages (see
    the module docstring); returns (without a restart) where it is set already, turned off, or of no use:
    not Linux with glibc, or transparent huge pages "never"."""
    tunables = os.environ.get("GLIBC_TUNABLES", "")
    if os.environ.get(HUGE_PAGES_ENV, "1") == "0" or "glibc.malloc.hugetlb" in tunables or not huge_pages_usable():
        return
    env = dict(os.environ, GLIBC_TUNABLES=":".join(t for t in (tunables, HUGE_PAGES_TUNABLE) if t))
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, sys.orig_argv, env)

