"""train.optimizer -> the optimizer over the trained parameters."""

from __future__ import annotations

import torch

from align.errors import AlignError


def adamw(params, **settings) -> torch.optim.AdamW:
    """AdamW as one fused kernel per step where torch has one for these parameters (CUDA and CPU
    float tensors; several times faster than the per-tensor loop on a CPU), else the multi-tensor
    (foreach) version. All three compute the same update."""
    params = list(params)
    try:
        return torch.optim.AdamW(params, fused=True, **settings)
    except (RuntimeError, ValueError):
        return torch.optim.AdamW(params, foreach=True, **settings)


def make_optimizer(kind: str, params, **settings) -> torch.optim.Optimizer:
    """train.optimizer -> the optimizer: `adamw` (torch's, see `adamw`), or bitsandbytes' 8-bit AdamW
    (`adamw_8bit`; `paged_adamw_8bit` also pages its states to host memory when the GPU runs short),
    whose kernels need a CUDA GPU."""
    if kind == "adamw":
        return adamw(params, **settings)
    if not torch.cuda.is_available():
        raise AlignError(f"train.optimizer={kind!r} needs a CUDA GPU (bitsandbytes' 8-bit optimizers have no CPU "
                         "kernels) and none is available; use train.optimizer: adamw")
    import bitsandbytes as bnb

    optimizer = bnb.optim.PagedAdamW8bit if kind == "paged_adamw_8bit" else bnb.optim.AdamW8bit
    return optimizer(list(params), **settings)
