"""Our sampler: each prompt is prefilled once and its KV cache shared by its G samples, all live
rows decode together one token per step, and finished rows leave the batch. On CUDA the steps
replay a CUDA graph over a static cache instead (`align.rollout.static_decoder`: every row stays,
the host launches one graph per step instead of each kernel)."""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
from transformers import DynamicCache

from align.errors import AlignError
from align.models.head import compute_dtype
from align.rollout.static_decoder import StaticDecoder, StaticDecodingError, check_first_step, static_decoding_refusal
from align.rollout.sampling import (Rollout, SamplingParams, StopRule, check_prompts, eos_token_ids, inference,
                                    left_pad, logits_processors, model_device, next_tokens, sampling_generator,
                                    with_cache)

logger = logging.getLogger(__name__)


@dataclass
class LiveRows:
    """The rows still decoding, B of them, and their state.

    rows [B]: each row's index in the rollout. ids [B, L + max_new]: prompt (left-padded with its
    own first token) then the tokens generated so far; mask [B, L + max_new]: 0 on the padding, 1
    elsewhere (the columns still to be generated included). width: the columns in use, the same
    for every row. positions [B]: the position id of each row's next input token (its real length,
    not the padded one). cache: keys and values of the columns fed to the model so far.
    """

    rows: torch.Tensor
    ids: torch.Tensor
    mask: torch.Tensor
    width: int
    positions: torch.Tensor
    cache: DynamicCache | None

    def push(self, tokens: torch.Tensor) -> None:
        """Append the [B] new tokens."""
        self.ids[:, self.width] = tokens
        self.width += 1

    def keep(self, index: torch.Tensor) -> None:
        """Keep only the rows at `index` [B'] (cache included): finished rows stop costing compute."""
        self.rows, self.ids, self.mask, self.positions = (x[index] for x in (self.rows, self.ids, self.mask,
                                                                             self.positions))
        if self.cache is not None:  # (a static decoder keeps every row)
            self.cache.batch_select_indices(index)


def total_variation(logits: torch.Tensor, other: torch.Tensor) -> torch.Tensor:
    """[..., V] logits each -> [...] the total variation distance of their softmax distributions."""
    return 0.5 * (logits.softmax(-1) - other.softmax(-1)).abs().sum(-1)


def sampling_tolerance(dtype: torch.dtype) -> float:
    """The largest total variation between the engine's and forward()'s next-token distributions that
    rounding explains, for a model computing in `dtype`. Total variation, not the largest log-prob
    difference: in 16 bits the many unlikely tokens' log-probs round far apart while moving almost
    no probability. Measured: float32 ~3e-7; a model whose cached decoding scales its logits by 1.7
    is 0.35 away. 16 bits: not yet measured on a real model (random-token probes give flat
    distributions, the most sensitive to rounding), so the bound is loose."""
    return 1e-4 if dtype == torch.float32 else 0.15


ENGINE_FIX = "set sampling.engine: hf (transformers' generate) to sample from it"


class PrefixSharedEngine:
    """Sampling on the policy's own modules (LoRA and QLoRA included); no weight sync needed.

    static: decode through a `StaticDecoder` (None: on CUDA only, with CUDA graphs; True: also
    elsewhere, without graphs, as the tests do; False: never). Models it refuses decode the usual way."""

    def __init__(self, model: torch.nn.Module, tokenizer, static: bool | None = None, check: bool = True):
        self.model, self.tokenizer, self.static = model, tokenizer, static
        self.capture_failed = False  # once a capture failed, later rollouts do not try again
        if check:  # (off only to measure the probe itself: benchmarks/gpu_checks.py)
            self.check_matches_forward()

    def check_matches_forward(self) -> None:
        """AlignError unless the engine's next-token distributions on a short probe (prompts of 7 and
        4 tokens, two samples each, three decoding steps) equal those of the model's own forward()
        of each whole sequence (`sampling_tolerance`). The shared prompt cache, left padding and
        decoding masks rest on how a family reads position ids and masks: a scan of transformers
        5.24's families found some that crash here (recurrent and linear-attention layers) and some
        that sample from other numbers than their forward's (positions counted along the row, e.g.
        BART's decoder)."""
        error = self.probe_error()
        dtype = compute_dtype(self.model)
        if not error <= sampling_tolerance(dtype):
            raise AlignError(f"model type {self.model_type!r}: the prefix_shared engine's next-token distributions are "
                             f"{error:.3g} (total variation) from the model's own forward()'s on a probe (tolerance "
                             f"{sampling_tolerance(dtype)} in {dtype}); {ENGINE_FIX}")

    @torch.no_grad()
    def probe_error(self) -> float:
        """The largest total variation between the engine's next-token distributions and forward()'s
        on `check_matches_forward`'s probe; AlignError if the engine fails on it."""
        device = model_device(self.model)
        error = 0.0
        try:
            prompts, steps = self.probe_tokens()
            with inference(self.model):
                live, logits = self.prefill(prompts, 2, len(steps), device)
                per_step = [logits.float()]  # [4, V] each: the samples of prompt 0, then of prompt 1
                for tokens in steps:
                    live.push(tokens.to(device))
                    per_step.append(self.decode(live).float())
                for row in range(4):  # forward() of the whole sequence gives every step's logits at once
                    prompt = prompts[row // 2]
                    sequence = torch.tensor([prompt + steps[:, row].tolist()], device=device)
                    want = self.model(input_ids=sequence, attention_mask=torch.ones_like(sequence),
                                      use_cache=False).logits[0, len(prompt) - 1:].float()
                    got = torch.stack([logits[row] for logits in per_step])
                    error = max(error, total_variation(got, want).max().item())
        except torch.OutOfMemoryError:
            raise
        except Exception as failure:  # noqa: BLE001 - any other failure on the probe: the engine cannot run it
            raise AlignError(f"model type {self.model_type!r}: the prefix_shared engine fails on a probe "
                             f"({type(failure).__name__}: {failure}); {ENGINE_FIX}") from failure
        return error

    @property
    def model_type(self) -> str:
        return getattr(getattr(self.model, "config", None), "model_type", "?")

    def probe_tokens(self) -> tuple[list[list[int]], torch.Tensor]:
        """`check_matches_forward`'s prompts (7 and 4 tokens) and sampled tokens [3 steps, 4 samples]:
        fixed random ids of the input vocabulary, the pad id left out (some families treat it apart)."""
        embeddings = getattr(self.model, "get_input_embeddings", lambda: None)()
        config = self.model.config
        vocab = embeddings.num_embeddings if embeddings is not None else \
            (config.get_text_config() if hasattr(config, "get_text_config") else config).vocab_size
        pad = getattr(config, "pad_token_id", None)
        ids = torch.randint(0, vocab, (23,), generator=torch.Generator().manual_seed(0))
        ids = torch.where(ids == pad, (ids + 1) % vocab, ids) if pad is not None else ids
        return [ids[:7].tolist(), ids[7:11].tolist()], ids[11:].view(3, 4)

    def sync_weights(self) -> None:
        """The engine runs the trained modules themselves."""

    def generate(self, prompt_ids: list[list[int]], params: SamplingParams, group_size: int = 1) -> Rollout:
        check_prompts(prompt_ids, group_size)
        total = len(prompt_ids) * group_size
        completions: list[list[int]] = [[] for _ in range(total)]
        finished = [False] * total
        rollout = Rollout([list(p) for p in prompt_ids], completions, finished, group_size)
        if total == 0:
            return rollout
        device = model_device(self.model)
        processors = logits_processors(params)
        stop = StopRule(self.tokenizer, params, eos_token_ids(self.tokenizer, self.model))
        generator = sampling_generator(params, device)
        with inference(self.model):
            live, logits = self.prefill(prompt_ids, group_size, params.max_new_tokens, device)
            decoder = self.static_decoder(live, params.max_new_tokens, device)
            for step in range(params.max_new_tokens):
                scores = processors(live.ids[:, :live.width], logits.float())  # float32, as in generate
                tokens = next_tokens(scores, params, generator)
                alive = []
                for row, token in zip(live.rows.tolist(), tokens.tolist()):
                    completions[row].append(token)
                    finished[row] = stop(completions[row])
                    alive.append(not finished[row])
                if step == params.max_new_tokens - 1 or not any(alive):
                    break
                live.push(tokens)
                if not all(alive):
                    live.keep(torch.tensor(alive, device=device).nonzero()[:, 0])
                if decoder is None:
                    logits = self.decode(live)
                else:
                    logits, decoder = self.decode_static(decoder, live)
        return rollout

    def static_decoder(self, live: LiveRows, max_new_tokens: int, device: torch.device) -> StaticDecoder | None:
        """A static decoder for this rollout, or None (refused, not asked for, or no memory for it)."""
        wanted = device.type == "cuda" if self.static is None else self.static
        if not wanted or max_new_tokens < 2:
            return None
        refusal = static_decoding_refusal(self.model, live.cache)
        if refusal is not None:
            logger.info("decoding without a static cache: %s", refusal)
            return None
        try:
            return StaticDecoder(self.model, live.cache, live.mask[:, :live.width], live.positions, max_new_tokens,
                                 graphs=device.type == "cuda" and not self.capture_failed)
        except torch.OutOfMemoryError as error:
            logger.warning("decoding without a static cache: %s", error)
            return None

    def decode_static(self, decoder: StaticDecoder, live: LiveRows) -> tuple[torch.Tensor, StaticDecoder | None]:
        """`decode` through the static decoder -> (logits [B, V], the decoder to go on with).

        Its first step is checked against the usual step, from the prefill's cache (kept until then):
        every layer must have updated the decoder's cache and the log-probs must agree (to float
        noise); else this rollout goes on the usual way, and a model that did not use the cache as
        expected is never decoded statically again by this engine."""
        if live.cache is None:
            return decoder.step(live.rows, live.ids[:, live.width - 1]), decoder
        expected = self.decode(live)
        try:
            logits = decoder.step(live.rows, live.ids[:, live.width - 1])
            check_first_step(logits, expected, decoder.keys[0].dtype)
        except Exception as error:  # noqa: BLE001 (any failure of the first step: the usual way is exact)
            logger.warning("decoding without a static cache: %s: %s", type(error).__name__, error)
            if isinstance(error, (StaticDecodingError, TypeError, AttributeError)):
                self.static = False  # the model's forward does not fit the decoder (not a passing failure)
            return expected, None
        self.capture_failed = self.capture_failed or decoder.capture_failed
        live.cache = None
        return logits, decoder

    def prefill(self, prompt_ids: list[list[int]], group_size: int, max_new_tokens: int,
                device: torch.device) -> tuple[LiveRows, torch.Tensor]:
        """Run the N prompts once (left-padded, one batch), then repeat every cache row G times.

        Returns the N*G live rows and the logits of their first new token [N*G, V].
        """
        ids, mask = left_pad(prompt_ids, None, device)
        cache = DynamicCache(config=getattr(self.model, "config", None))
        out = self.model(input_ids=ids, attention_mask=mask, position_ids=(mask.cumsum(-1) - 1).clamp(min=0),
                         logits_to_keep=1, **with_cache(self.model, cache))
        cache.batch_repeat_interleave(group_size)
        n, length = ids.shape
        room = ids.new_zeros(n, max_new_tokens)
        live = LiveRows(rows=torch.arange(n * group_size, device=device),
                        ids=torch.cat([ids, room], 1).repeat_interleave(group_size, 0),
                        mask=torch.cat([mask, room + 1], 1).repeat_interleave(group_size, 0),
                        width=length, positions=mask.sum(-1).repeat_interleave(group_size, 0), cache=cache)
        return live, out.logits[:, -1].repeat_interleave(group_size, 0)

    def decode(self, live: LiveRows) -> torch.Tensor:
        """Feed each live row its newest token; returns the logits of the next one [B, V]."""
        out = self.model(input_ids=live.ids[:, live.width - 1:live.width], attention_mask=live.mask[:, :live.width],
                         position_ids=live.positions[:, None], **with_cache(self.model, live.cache))
        live.positions = live.positions + 1
        return out.logits[:, -1]
