"""Preemption: SIGTERM, SIGINT and SIGUSR1 (what SLURM, `docker stop` and Ctrl-C send) ask a loop to stop at its
next safe point (the Trainer after the current step, the search after the current generation), which saves its
state and raises `Stopped`. A second signal interrupts at once."""
from __future__ import annotations

import contextlib
import signal
import threading

SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1)
_received: list[int] = []


class Stopped(Exception):
    """A loop stopped on a signal after saving its state; `code` is the exit status (128 + 15 or 128 + 2)."""

    def __init__(self, message: str, signum: int):
        super().__init__(message)
        self.code = 130 if signum == signal.SIGINT else 143


@contextlib.contextmanager
def stop_signals():
    """Within the block the first of SIGNALS is only recorded; a second one raises KeyboardInterrupt."""
    if threading.current_thread() is not threading.main_thread():  # handlers can only be set there
        yield
        return

    def record(signum, frame):
        if _received:
            raise KeyboardInterrupt
        _received.append(signum)

    previous = {s: signal.signal(s, record) for s in SIGNALS}
    _received.clear()
    try:
        yield
    finally:
        for s, h in previous.items():
            signal.signal(s, h)
        _received.clear()


def received() -> int:
    """The signal this process received inside stop_signals(), or 0."""
    return _received[0] if _received else 0


def stop_requested() -> int:
    """The signal any process received, or 0: under torch.distributed a MAX all-reduce of the flag, so that every
    rank stops at the same step. Every rank must call it at the same points."""
    import torch
    import torch.distributed as dist

    flag = received()
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else "cpu"
        t = torch.tensor([flag], device=device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        flag = int(t.item())
    return flag
