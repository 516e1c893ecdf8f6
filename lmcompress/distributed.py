"""Process groups: how the ranks start, how long a collective may wait, and who tokenizes first.

A rank that dies is noticed by the launcher (torchrun, deepspeed), which ends the others within seconds. A rank
that stops answering without dying (a stuck disk, a frozen node) is noticed only by the collective timeout:
``COLLECTIVE_TIMEOUT_S`` unless ``--ddp_timeout`` says otherwise. Work that legitimately keeps the other ranks
waiting for long (the first tokenization of a large corpus) waits on its own gloo group without that limit.
"""
import contextlib
import os
from datetime import timedelta

import torch

from .cli import ArgumentParser

COLLECTIVE_TIMEOUT_S = 600
LONG_WAIT = timedelta(days=2)


def init_distributed(timeout_s=COLLECTIVE_TIMEOUT_S):
    """Rank, world size and device from the launcher's environment (torchrun, deepspeed, torch.distributed.launch)."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = torch.device("cuda", local_rank) if torch.cuda.is_available() else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if world_size > 1 and not torch.distributed.is_initialized():
        torch.distributed.init_process_group("nccl" if device.type == "cuda" else "gloo",
                                             timeout=timedelta(seconds=timeout_s))
    rank = torch.distributed.get_rank() if world_size > 1 else 0
    return rank, world_size, device


def distributed_world():
    """This process's rank and the world size of the running process group ((0, 1) without one)."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


def all_reduce_sum(tensor):
    """``tensor`` summed in place over the ranks (left as it is in a single process)."""
    if distributed_world()[1] > 1:
        torch.distributed.all_reduce(tensor)
    return tensor


def wait_for_everyone():
    """Wait until every rank gets here (nothing to wait for in a single process)."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.barrier()


def end_process_group():
    """Leave the process group together: a rank that tears gloo down while another still works on its last
    lines (rank 0 writing the result) can abort at exit ("terminate called without an active exception")."""
    if distributed_world()[1] > 1:
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()


@contextlib.contextmanager
def local_main_first():
    """The body runs on each node's local rank 0 first (filling that node's cache), then on the other ranks
    (which find it filled). They wait on a gloo group of their own, free of the collective timeout."""
    if distributed_world()[1] == 1:
        yield
        return
    is_local_main = int(os.environ.get("LOCAL_RANK", "0")) == 0
    group = torch.distributed.new_group(backend="gloo", timeout=LONG_WAIT)
    try:
        if not is_local_main:
            torch.distributed.barrier(group=group)
        yield
        if is_local_main:
            torch.distributed.barrier(group=group)
    finally:
        torch.distributed.destroy_process_group(group)


def start_process_group(argv, prog):
    """The setup step of a torchrun/deepspeed job on CPU, before its training flags are parsed: start the gloo
    process group with ``--ddp_timeout``; return the ``TrainingArguments`` defaults that make the Trainer use it.
    Nothing to do on GPUs or in a single process.

    Building ``TrainingArguments`` asks accelerate for the device, which starts the group: on CPU, accelerate (1.15)
    would start it without the timeout (a rank that stopped answering would hold the others for torch's default
    30 minutes) and, for DeepSpeed, with no backend at all (every rank would train alone on all the data). So the
    two flags that decide it are read here first.
    """
    if torch.cuda.is_available() or int(os.environ.get("LOCAL_RANK", -1)) == -1:
        return {}
    from accelerate import PartialState

    parser = ArgumentParser(prog=prog, add_help=False)
    parser.add_argument("--ddp_timeout", type=int, default=COLLECTIVE_TIMEOUT_S)
    parser.add_argument("--deepspeed")
    flags, _ = parser.parse_known_args(argv)
    timeout = timedelta(seconds=flags.ddp_timeout)
    if flags.deepspeed:
        os.environ["ACCELERATE_USE_DEEPSPEED"] = "true"  # how accelerate is told, as the Trainer does
        try:
            PartialState(backend="gloo", timeout=timeout)
        finally:
            del os.environ["ACCELERATE_USE_DEEPSPEED"]
    else:
        PartialState(cpu=True, backend="gloo", timeout=timeout)
    return {"accelerator_config": {"use_configured_state": True}}
