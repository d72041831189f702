"""How the torchrun test workers end: together, and without the interpreter's teardown.

A rank that exits while another still holds gloo connections can abort in gloo's threads ("terminate called without
an active exception", SIGABRT), and torchrun then fails the run although every result was saved. So the ranks meet
at a barrier, close the process group, and leave with ``os._exit(0)``: the result files are closed by then, and the
C++ destructors that run at a normal interpreter exit (where the abort still happened after the barrier and
destroy_process_group, once in a full-suite run) are skipped.
"""

import os
import sys

import torch


def leave_together() -> None:
    if torch.distributed.is_initialized():
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
