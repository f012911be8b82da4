"""Moving a policy's weights from the trainer to a rollout server (`align serve-rollouts`).

Two ways, as `sampling.server.transport` says:
- `http`: the tensors travel in the request body as safetensors bytes (no pickle: a server loads
  only tensors). The whole model is encoded in memory once per sync; for small models and any network.
- `collective`: the names, shapes and dtypes travel as JSON and the tensors through a process group
  of two (the trainer's main process, rank 0, sends; the server, rank 1, receives), outside the
  training's own process group: NCCL between GPUs, as TRL's server mode syncs, and gloo on CPUs,
  where the same code is tested. The server hosts the group's store (`TCPStore`).
"""

from __future__ import annotations

import datetime
from collections.abc import Iterable

import torch

from align.errors import AlignError

GROUP_PREFIX = "align-weights"


def encode(weights: Iterable[tuple[str, torch.Tensor]]) -> bytes:
    """safetensors bytes of `weights` (tied tensors stored once per name)."""
    from safetensors.torch import save

    return save({name: tensor.detach().to("cpu").contiguous().clone() for name, tensor in weights})


def decode(data: bytes) -> dict[str, torch.Tensor]:
    from safetensors.torch import load

    return load(data)


def spec(name: str, tensor: torch.Tensor) -> list:
    """[name, shape, dtype]: what the receiver allocates before a tensor arrives."""
    return [name, list(tensor.shape), str(tensor.dtype).removeprefix("torch.")]


def dtype_of(name: str) -> torch.dtype:
    dtype = getattr(torch, name, None)
    if not isinstance(dtype, torch.dtype):
        raise ValueError(f"unknown dtype {name!r}")
    return dtype


class WeightGroup:
    """The process group of two that carries tensors from the trainer (rank 0) to the server (rank 1).

    backend: gloo (CPU tensors) or nccl (CUDA tensors; both sides need a GPU). The server `listen`s,
    then both sides make their member (the trainer through `join`); each blocks until both are there."""

    def __init__(self, store, rank: int, backend: str, timeout_s: float):
        timeout = datetime.timedelta(seconds=timeout_s)
        prefixed = torch.distributed.PrefixStore(GROUP_PREFIX, store)
        if backend == "gloo":
            self.group = torch.distributed.ProcessGroupGloo(prefixed, rank, 2, timeout)
            self.device = torch.device("cpu")
        elif backend == "nccl":
            if not torch.cuda.is_available() or not hasattr(torch.distributed, "ProcessGroupNCCL"):
                raise AlignError("sampling.server.backend nccl needs a CUDA build of torch and a GPU on both "
                                 "sides; use gloo (CPU tensors)")
            options = torch.distributed.ProcessGroupNCCL.Options()
            options._timeout = timeout
            self.group = torch.distributed.ProcessGroupNCCL(prefixed, rank, 2, options)
            self.device = torch.device("cuda", torch.cuda.current_device())
        else:
            raise AlignError(f"sampling.server.backend: {backend!r} is not gloo or nccl")
        self.store, self.rank = store, rank  # the store must outlive the group

    @staticmethod
    def listen(host: str, port: int, timeout_s: float) -> torch.distributed.TCPStore:
        """The server's side, step 1: the store the trainer connects to, at host:port (port 0: any free
        one, read back from `.port`). Step 2, `WeightGroup(store, 1, backend, timeout_s)`, waits for the trainer."""
        return torch.distributed.TCPStore(host, port, world_size=2, is_master=True, wait_for_workers=False,
                                          timeout=datetime.timedelta(seconds=timeout_s))

    @classmethod
    def join(cls, host: str, port: int, backend: str, timeout_s: float) -> "WeightGroup":
        """The trainer's side: rank 0 of the group whose store the server hosts at host:port."""
        store = torch.distributed.TCPStore(host, port, world_size=2, is_master=False,
                                           timeout=datetime.timedelta(seconds=timeout_s))
        return cls(store, 0, backend, timeout_s)

    def send(self, tensor: torch.Tensor) -> None:
        self._broadcast(tensor.detach().to(self.device).contiguous())

    def receive(self, shape: list[int], dtype: torch.dtype) -> torch.Tensor:
        tensor = torch.empty(shape, dtype=dtype, device=self.device)
        self._broadcast(tensor)
        return tensor

    def finish(self) -> None:
        """Wait until every received tensor has arrived (NCCL's wait only orders the GPU's stream)."""
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def _broadcast(self, tensor: torch.Tensor) -> None:
        options = torch.distributed.BroadcastOptions()
        options.rootRank = 0
        self.group.broadcast([tensor], options).wait()
