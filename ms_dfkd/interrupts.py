"""Ctrl-C that survives MindSpore.

While MindSpore compiles or runs a graph it installs its own SIGINT handler (``SignalGuard`` in
libmindspore_common) and puts the previous one back afterwards. A Ctrl-C that lands inside that
window, which is most of a training step, ends the process with SIGTERM and nothing is saved
(measured on ``ms-dfkd distill``: exit status 143, no checkpoint of the interrupted round).

So the command line blocks SIGINT in its main thread before MindSpore starts any thread (threads
inherit the mask, so no thread takes the signal and MindSpore's handler never runs), and one watcher
thread takes it with ``sigwait`` and calls whatever handler the running command registered with
``on_sigint``: the driver finishes its step and saves. Without a registered handler the first Ctrl-C
raises KeyboardInterrupt in the main thread (when it next runs Python code) and the second exits at
once with status 130.
"""
import _thread
import contextlib
import logging
import os
import signal
import threading

log = logging.getLogger("ms_dfkd")

_state = {"installed": False, "handler": None, "count": 0}


def install():
    """Block SIGINT here and start the watcher. Call from the main thread before importing mindspore."""
    if _state["installed"] or threading.current_thread() is not threading.main_thread():
        return False
    if not hasattr(signal, "pthread_sigmask"):  # not POSIX: leave Python's default
        return False
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
    threading.Thread(target=_watch, name="ms-dfkd-sigint", daemon=True).start()
    _state["installed"] = True
    return True


def installed():
    return _state["installed"]


def _watch():
    while True:
        signal.sigwait({signal.SIGINT})
        _state["count"] += 1
        handler = _state["handler"]
        if handler is not None:
            handler(signal.SIGINT, None)
        elif _state["count"] == 1:
            _thread.interrupt_main()
        else:
            abort()


def abort():
    """Exit now (second Ctrl-C). Checkpoints are written atomically, so the last one stays whole."""
    log.warning("Ctrl-C again: exiting without saving")
    logging.shutdown()
    os._exit(130)


@contextlib.contextmanager
def on_sigint(handler):
    """Route Ctrl-C to handler(signum, frame) inside the block: through the watcher when it is
    installed, else through signal.signal (library use, tests)."""
    if _state["installed"]:
        old = _state["handler"]
        _state["handler"], _state["count"] = handler, 0
        try:
            yield
        finally:
            _state["handler"] = old
    else:
        old = signal.signal(signal.SIGINT, handler)
        try:
            yield
        finally:
            signal.signal(signal.SIGINT, old)
