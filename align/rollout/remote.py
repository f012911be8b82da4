"""`sampling.engine: server`: rollouts from an `align serve-rollouts` process (`align.rollout.server`),
on GPUs of its own, with the policy's weights sent to it before every rollout.

Every training process asks the server for its own share of the prompts; only the main process
sends weights (`sampling.server.transport`: http or collective, see `align.rollout.transport`),
then every process reads the server's new weights version and checks that each rollout it gets
was sampled from it, so a rollout from stale weights (a second trainer on the same server) is an
error, never a silent off-policy batch.
"""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from dataclasses import asdict
from urllib.parse import urlparse

import torch

from align.errors import AlignError
from align.models.merged import merged_weights
from align.rollout import transport
from align.rollout.sampling import Rollout, SamplingParams, check_prompts


class RemoteEngine:
    """The RolloutEngine interface over HTTP. model: the policy (plain or peft) whose weights
    `sync_weights` sends; options: a ServerConfig."""

    def __init__(self, model: torch.nn.Module, tokenizer, options):
        self.model, self.tokenizer, self.options = model, tokenizer, options
        self.url = options.url.rstrip("/")
        health = self.request("GET", "/health")
        self.dtype = transport.dtype_of(health["dtype"])
        self.version: int | None = None
        self.group: transport.WeightGroup | None = None
        self.sync_weights()

    # ---- the engine interface -------------------------------------------------------------------
    def generate(self, prompt_ids: list[list[int]], params: SamplingParams, group_size: int = 1) -> Rollout:
        check_prompts(prompt_ids, group_size)
        if not prompt_ids:
            return Rollout([], [], [], group_size)
        answer = self.request("POST", "/generate", {"prompt_ids": [list(p) for p in prompt_ids],
                                                    "params": asdict(params), "group_size": group_size})
        if answer["version"] != self.version:
            raise AlignError(f"the rollout server at {self.url} sampled with weights version {answer['version']}, "
                             f"not the {self.version} this trainer sent: is another run using the same server? "
                             "Start one `align serve-rollouts` per run")
        return Rollout([list(p) for p in prompt_ids], answer["completion_ids"], answer["finished"], group_size)

    def sync_weights(self) -> None:
        """The main process sends the policy's current weights (LoRA merged, a 4-bit base dequantized);
        every process calls it, and then samples from the version the server holds."""
        distributed = torch.distributed.is_available() and torch.distributed.is_initialized()
        if not distributed or torch.distributed.get_rank() == 0:
            self.send_weights()
        if distributed:
            torch.distributed.barrier()
        self.version = self.request("GET", "/health")["version"]

    def send_weights(self) -> None:
        weights = merged_weights(self.model, self.dtype)
        if self.options.transport == "http":
            self.request("POST", "/weights", data=transport.encode(weights))
            return
        if self.group is None:
            backend = self.options.backend if self.options.backend != "auto" else \
                ("nccl" if torch.cuda.is_available() else "gloo")
            port = self.request("POST", "/weights/group", {"backend": backend})["port"]
            self.group = transport.WeightGroup.join(urlparse(self.url).hostname, port, backend, self.options.timeout_s)
        # two passes (LoRA deltas computed twice) so that one merged weight at a time is alive
        self.request("POST", "/weights/announce", {"tensors": [transport.spec(n, t) for n, t in weights]})
        for _, tensor in merged_weights(self.model, self.dtype):
            self.group.send(tensor)
        self.request("POST", "/weights/commit")

    def request(self, method: str, path: str, body: dict | None = None, data: bytes | None = None) -> dict:
        return request(self.url, method, path, body, data, self.options.timeout_s)


def request(url: str, method: str, path: str, body: dict | None = None, data: bytes | None = None,
            timeout_s: float = 600.0) -> dict:
    """The JSON answer of the server at `url`; an AlignError with its message when it refuses, or when
    nothing answers. body: JSON to send; data: raw bytes (safetensors) instead."""
    if body is not None:
        data = json.dumps(body).encode()
    message = urllib.request.Request(url.rstrip("/") + path, data=data, method=method)
    message.add_header("Content-Type", "application/octet-stream" if body is None else "application/json")
    try:
        with urllib.request.urlopen(message, timeout=timeout_s) as response:
            return json.loads(response.read())
    except urllib.error.HTTPError as error:
        text = error.read().decode(errors="replace")
        try:
            text = json.loads(text)["error"]
        except (ValueError, KeyError):
            pass
        raise AlignError(f"the rollout server at {url} refused {method} {path}: {text}") from None
    except (urllib.error.URLError, OSError) as error:
        reason = getattr(error, "reason", error)
        if isinstance(reason, TimeoutError):
            raise AlignError(f"the rollout server at {url} did not answer {method} {path} within {timeout_s:g} s "
                             "(sampling.server.timeout_s); it serves one request at a time, so with many "
                             "processes raise the timeout") from None
        raise AlignError(f"sampling.server.url {url}: no rollout server answers ({reason}); start one with "
                         "`align serve-rollouts RECIPE --port PORT` and set the url to it") from None
