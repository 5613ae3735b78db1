"""The processes of a run: how many the launcher started, which one is the main one, the
process group's teardown, and a graceful stop on Ctrl-C or SIGTERM."""

from __future__ import annotations

import signal
import threading
from typing import Any

import torch


def launched_processes() -> int:
    """Processes started by the launcher (torchrun, ``accelerate launch``, mpirun); 1 if none."""
    from accelerate.utils import get_int_from_env

    return get_int_from_env(["WORLD_SIZE", "PMI_SIZE", "OMPI_COMM_WORLD_SIZE",
                             "MV2_COMM_WORLD_SIZE"], 1)


def multi_cpu() -> bool:
    """Many processes and no CUDA: Accelerate must be told ``cpu=True`` to join them (gloo);
    without it, under ``torchrun`` each CPU process sees itself alone (``DistributedType.NO``).
    ``accelerate launch --cpu`` says so through ``ACCELERATE_USE_CPU``."""
    return not torch.cuda.is_available() and launched_processes() > 1


def is_main_process() -> bool:
    """True in a single process and on the main process of a multi-process launch: the one
    process that writes run folders and prints. (Starts the process group if none is up yet,
    as :func:`difflab.training.train` would.)"""
    from accelerate import PartialState

    return PartialState(cpu=multi_cpu()).is_main_process


def close_process_group() -> None:
    """Tear down the process group of a multi-process launch, if one is up (a no-op
    otherwise).

    Left to interpreter shutdown, the DDP wrapper (in a reference cycle) and with it the gloo
    group are freed by Python's final garbage collection, while a gloo worker thread may still
    be releasing a finished all-reduce whose tensors need the GIL to drop their Python objects;
    the finalising interpreter refuses the GIL to that thread and the process aborts
    ("terminate called without an active exception"; caught in gdb, about 1 run in 5 of the
    2-process CLIP test), which the launcher reports as a failed run. Collecting first frees
    those objects while the interpreter is whole (0 aborts in 20 runs after). No barrier: the
    main process may still be writing samples and the report, and nothing collective follows."""
    import gc

    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        gc.collect()  # DDP wrappers in reference cycles hold the group: free them now, not
        dist.destroy_process_group()  # in the interpreter's final collection (see above)


class GracefulStop:
    """While open, Ctrl-C or SIGTERM sets ``signal``: the loop finishes its step, writes a
    checkpoint and stops (a second signal stops at once). Only in the main thread (Python
    delivers signals there); on exit the previous handlers are back."""

    def __enter__(self) -> GracefulStop:
        self.signal: int | None = None
        self._old: dict[int, Any] = {}
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._old[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum: int, frame: Any) -> None:
        if self.signal is not None:
            raise KeyboardInterrupt
        self.signal = signum

    def __exit__(self, *exc: Any) -> None:
        for sig, handler in self._old.items():
            signal.signal(sig, handler if handler is not None else signal.SIG_DFL)
