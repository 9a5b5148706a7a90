"""The multi-process harness of the distributed tests: torchrun / plain launches of tests/ddp_toy.py (or any module)
and the trained weights of a run folder, from checkpoint.pt or from an FSDP run's sharded checkpoint/ folder."""
import os
import socket
import subprocess
import sys
from pathlib import Path

TOY = str(Path(__file__).with_name("ddp_toy.py"))
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun(*args: str, processes: int = 2, timeout: int = 300) -> subprocess.CompletedProcess:
    """`python -m torch.distributed.run --nproc_per_node N ARGS` (a script path, or -m and a module)."""
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(processes),
                           "--master_port", str(port()), *args], env=ENV, capture_output=True, text=True,
                          timeout=timeout)


def python(*args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], env=ENV, capture_output=True, text=True, timeout=timeout)


def toy(run: Path, *args: str, processes: int = 1) -> subprocess.CompletedProcess:
    """tests/ddp_toy.py on `processes` processes (1: a plain process); asserts that every rank exited with 0."""
    r = torchrun(TOY, str(run), *args, processes=processes) if processes > 1 else python(TOY, str(run), *args)
    assert r.returncode == 0, r.stderr[-4000:]
    return r


def state(run: Path) -> dict:
    """A run folder's checkpoint, gathered to full tensors when sharded."""
    from dstudio.distill.core.checkpoint import read_run_checkpoint

    s = read_run_checkpoint(Path(run))
    return s["reader"].full_state() if "reader" in s else s


def weights(run: Path, module: str = "student") -> dict:
    return state(run)["modules"][module]


def max_diff(a: dict, b: dict) -> float:
    assert sorted(a) == sorted(b)
    return max(float((a[k].float() - b[k].float()).abs().max()) for k in a)
