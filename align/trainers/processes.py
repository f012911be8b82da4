"""The process state of a run: one process, or one of several under a launch (`accelerate launch`,
`torchrun`, DeepSpeed), as accelerate keeps it."""

from __future__ import annotations

import datetime

import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState
from accelerate.utils import DistributedDataParallelKwargs, InitProcessGroupKwargs

from align.models import zero


def process_accelerator(timeout_s: float = 1800) -> Accelerator:
    """accelerate's process state: one process, or one of several under `accelerate launch` or
    `torchrun` (DDP; over gloo on a machine without a GPU).

    Mixed precision is off: Align autocasts itself, per trainer (`Trainer.autocast`). The state is a
    process-wide singleton; if another library in this process (e.g. a TRL trainer, whose default is
    bf16) already set it to bf16, accelerate would silently wrap our model's forward in autocast, so
    the state is reset first. DDP does not broadcast buffers at each forward (a causal LM's buffers
    are constants such as rotary frequencies), so forwards need no other process: only backwards
    synchronize, and processes may run different numbers of forwards (evaluation, rollouts).
    timeout_s: how long a collective waits for the other processes (`train.ddp_timeout`). The state
    is set up by the first call; later calls get it as it is.
    """
    timeout = datetime.timedelta(seconds=timeout_s)
    options = dict(mixed_precision="no", cpu=not torch.accelerator.is_available(),
                   kwargs_handlers=[DistributedDataParallelKwargs(broadcast_buffers=False),
                                    InitProcessGroupKwargs(timeout=timeout)])
    if zero.launched():  # accelerate launched with a DeepSpeed config (align.models.zero); on a machine
        # without a GPU accelerate would drop DeepSpeed under cpu=True, and find no backend without gloo
        backend = {} if torch.accelerator.is_available() else {"backend": "gloo"}
        options = dict(mixed_precision="no", kwargs_handlers=[InitProcessGroupKwargs(timeout=timeout, **backend)])
    try:
        accelerator = Accelerator(**options)
    except ValueError:  # "AcceleratorState has already been initialized and cannot be changed"
        AcceleratorState._reset_state()
        accelerator = Accelerator(**options)
    if zero.launched():  # accelerate's DeepSpeed plugin told transformers to partition the models it
        # loads from now on (ZeRO-3 init); Align loads whole models and partitions the trained one when
        # its engine starts (zero3_init_flag is refused), so that setting is taken back
        from transformers.integrations import unset_hf_deepspeed_config

        unset_hf_deepspeed_config()
    return accelerator
