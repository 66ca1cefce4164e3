"""Runs a test body in several gloo processes (torch.distributed on the CPU)."""

import datetime
import os
import socket
import sys
import time

import torch.distributed as dist
import torch.multiprocessing as mp

TIMEOUT_S = 120


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _run(rank, world, port, body, args):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    timeout = datetime.timedelta(seconds=TIMEOUT_S)
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=timeout)
    body(rank, world, *args)  # an exception reaches the parent through torch.multiprocessing's error file
    dist.barrier()  # every rank is done with its collectives
    # Leave without tearing gloo down: its threads can abort the teardown ("terminate called without an active
    # exception", SIGABRT) after a body that passed, which failed CI runs; the spawned process holds nothing else.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def run_gloo(body, world: int, *args) -> None:
    """Calls `body(rank, world, *args)` in `world` spawned processes of one gloo group; a failure or a hang
    (collectives time out after TIMEOUT_S) fails the caller. `body` must be a module-level function."""
    context = mp.start_processes(
        _run, args=(world, _free_port(), body, args), nprocs=world, join=False, start_method="spawn"
    )
    deadline = time.monotonic() + 2 * TIMEOUT_S
    while not context.join(timeout=max(deadline - time.monotonic(), 0)):  # False until every process has exited
        if time.monotonic() >= deadline:
            for process in context.processes:
                process.kill()
            raise TimeoutError(f"{body.__name__} did not finish in {2 * TIMEOUT_S} s")
