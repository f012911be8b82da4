"""The batch layouts Align runs a decoder on, checked against the model's own forward() at load.

Besides one sequence per row (a padded batch), Align feeds a decoder two layouts of its own:

- packed rows: several examples in one row, position ids restarting at 0 for each
  (`align.data.collate.pack`; DPO pairs and GRPO groups without a shared prompt too);
- shared prompts: a prompt once, its completions as branches after it, under a 4-D mask
  (`align.data.groups`).

Both are exact only for a family whose layers read the position ids and the mask. A scan of every
causal-LM family transformers 5.24 builds found those where they are not, with no error:
positions counted along the row (the BART/mBART/Marian/Blenderbot/Pegasus/MVP/TrOCR decoders,
CPM-Ant), ALiBi biases measured along the row (MPT: shared prompts) and a recurrent model (RWKV);
layer kinds that no mask keeps inside one example (Mamba hybrids, LFM2, Qwen3-Next) are refused
by `align.models.packed.layer_windows`, and some families fail in these layouts (GPT-1, BLOOM, Mamba). `inexact_layouts` runs a short probe of each layout and
says which ones differ; trainers then give each sequence a row of its own (`Trainer.packs_rows`)
or its own copy of its prompt (`shared_prompt`), and the prefix_shared sampler is refused.
"""

from __future__ import annotations

import torch
from torch import nn

from align.data.groups import pack_groups
from align.errors import AlignError
from align.models.head import compute_dtype, decoder_of
from align.models.packed import decoder_hidden, takes_4d_masks

PACKED_ROWS = "packed rows"
SHARED_PROMPTS = "shared-prompt groups"


def layout_tolerance(dtype: torch.dtype) -> float:
    """Largest per-token relative difference of decoder states accepted: rounding only, for a model
    computing in `dtype` (`align.models.head.compute_dtype`: autocast and quantization count).
    Measured on tiny random models: fp32 ~1e-6, bf16 up to ~1.5e-2; a wrong layout is off by 0.5
    or more."""
    return 1e-3 if dtype == torch.float32 else 0.2


def _relative_error(got: torch.Tensor, want: torch.Tensor) -> float:
    """max over tokens of |got - want| / |want| ([T, H] each, norms over H)."""
    got, want = got.float(), want.float()
    return ((got - want).norm(dim=-1) / want.norm(dim=-1).clamp_min(1e-12)).max().item()


def inexact_layouts(lm: nn.Module) -> dict[str, str]:
    """{layout: why} for Align's layouts (PACKED_ROWS, SHARED_PROMPTS) whose decoder states differ
    from the decoder's own forward() of each sequence alone (`layout_errors`) by more than rounding
    (`layout_tolerance`); {} when both are exact."""
    prefix = f"model type {lm.config.model_type!r}: "
    tolerance = layout_tolerance(compute_dtype(lm))
    out = {}
    for layout, error in layout_errors(lm).items():
        if isinstance(error, str):
            out[layout] = error
        elif not error <= tolerance:
            out[layout] = (f"{prefix}{layout} give decoder states {error:.2g} (relative) away from the model's own "
                           f"forward() of each sequence alone (tolerance {tolerance}): its layers do not keep "
                           "each example apart by position ids and a mask")
    return out


@torch.no_grad()
def layout_errors(lm: nn.Module) -> dict[str, float | str]:
    """{layout: the largest per-token relative difference of its decoder states from the decoder's
    own forward() of each sequence alone, or why it fails}. Shared prompts are not probed under an
    attention implementation that takes no 4-D mask (flash_attention_2: the trainers never share
    prompts there).

    lm: a transformers model with `get_decoder()` (a causal LM or a sequence-classification model,
    adapters injected). Runs four forwards of at most 44 tokens in eval mode: the two sequences
    [prompt | branch] alone, packed in one row, and as a shared-prompt group.
    """
    was_training = lm.training
    lm.eval()
    try:
        decoder = decoder_of(lm)
        embeddings = lm.get_input_embeddings()
        device = embeddings.weight.device
        generator = torch.Generator().manual_seed(0)
        vocab = embeddings.num_embeddings
        pad = getattr(lm.config, "pad_token_id", None)  # (some families treat it apart, e.g. positions)
        prompt, branch_1, branch_2 = [[(t + 1) % vocab if t == pad else t for t in
                                       torch.randint(0, vocab, (n,), generator=generator).tolist()] for n in (11, 24, 9)]
        sequences = [prompt + branch_1, prompt + branch_2]  # the second branch sits 24 positions further along
        alone_states: list[torch.Tensor] = []

        def alone() -> list[torch.Tensor]:  # [T, H] each: the model's own forward, no position ids
            if not alone_states:
                alone_states.extend(decoder(input_ids=torch.tensor([s], device=device), use_cache=False)
                                    .last_hidden_state[0] for s in sequences)
            return alone_states

        def packed() -> list[tuple[torch.Tensor, torch.Tensor]]:
            ids = torch.tensor([sequences[0] + sequences[1]], device=device)
            positions = torch.tensor([[*range(len(sequences[0])), *range(len(sequences[1]))]], device=device)
            hidden = decoder_hidden(lm, ids, positions, None)[0]
            first, second = alone()
            return [(hidden[:len(first)], first), (hidden[len(first):], second)]

        def shared() -> list[tuple[torch.Tensor, torch.Tensor]]:
            # one row: [prompt[:-1] | prompt[-1] branch_1 | prompt[-1] branch_2]
            batch = pack_groups([(prompt, [branch_1, branch_2])], shared_prompt=True)
            hidden = decoder_hidden(lm, batch["input_ids"].to(device), batch["position_ids"].to(device),
                                    batch["attention_mask"].to(device))[0]
            start, end_1 = len(prompt) - 1, len(sequences[0])
            first, second = alone()
            return [(hidden[:end_1], first), (hidden[end_1:], second[start:])]

        probes = [(PACKED_ROWS, packed)] + ([(SHARED_PROMPTS, shared)] if takes_4d_masks(lm.config) else [])
        prefix = f"model type {lm.config.model_type!r}: "
        out = {}
        for layout, pairs in probes:
            try:
                compared = pairs()
            except AlignError as error:  # e.g. layers no mask applies to (`align.models.packed.layer_windows`)
                out[layout] = str(error)
                continue
            except Exception as error:  # noqa: BLE001 - any failure of the layout is a reason to refuse it
                out[layout] = f"{prefix}{layout} fail in its forward ({type(error).__name__}: {error})"
                continue
            out[layout] = max(_relative_error(got, want) for got, want in compared)
        return out
    finally:
        lm.train(was_training)


LENGTH_SWITCHED_ROPE = ("longrope", "dynamic")
"""Rotary embeddings whose frequencies every token of a forward shares, chosen by its longest
position (transformers' `dynamic_rope_update`): Phi-3/3.5/4-mini's `longrope` switches to its
long-context factors past `original_max_position_embeddings`; `dynamic` NTK rescales past
`max_position_embeddings` (and keeps the longest length seen, between calls)."""


def rope_switch_length(model: nn.Module) -> int | None:
    """The fewest tokens past which `model`'s rotary embedding changes the frequencies of every
    sequence in the forward (`LENGTH_SWITCHED_ROPE`); None where it never does."""
    lengths = []
    for module in model.modules():
        kinds = getattr(module, "rope_type", None)
        config = getattr(module, "config", None)
        if kinds is None or config is None:
            continue
        for layer_type, kind in (kinds.items() if isinstance(kinds, dict) else [(None, kinds)]):
            if kind == "longrope":
                params = config.rope_parameters if layer_type is None else config.rope_parameters[layer_type]
                lengths.append(int(params["original_max_position_embeddings"]))
            elif "dynamic" in str(kind):
                lengths.append(int(module.original_max_seq_len))
    return min(lengths, default=None)


def check_rope_lengths(model: nn.Module, longest: int, setting: str, what: str = "the model") -> None:
    """AlignError if sequences of up to `longest` tokens (`setting` bounds them) can pass the length at
    which `what`'s rotary embedding switches frequencies: a long sequence would change those of every
    shorter one packed, padded or grouped with it into one forward, so their log-probs would not be
    their own forward()'s. (Phi-3.5-mini's switch: 4,096 tokens.)"""
    switch = rope_switch_length(model)
    if switch is not None and longest > switch:
        config = getattr(model, "config", None)
        name = f"model type {getattr(config, 'model_type', '?')!r}"
        raise AlignError(f"{what} ({name}) scales its rotary embedding by the longest sequence in a forward, past "
                         f"{switch} tokens, for all the sequences in it; this run's sequences reach {longest} tokens "
                         f"({setting}), so a short one packed, padded or grouped with a long one would get other "
                         f"log-probs than its own forward() gives. Keep {setting} at most {switch}")
