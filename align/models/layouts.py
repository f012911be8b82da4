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
layer kinds that no mask keeps inside one example (Mamba and its hybrids, LFM2, Qwen3-Next) are
refused by `align.models.packed.layer_windows`, and some families fail (GPT-1, BLOOM). `inexact_layouts` runs a short probe of each layout and
says which ones differ; trainers then give each sequence a row of its own (`Trainer.packs_rows`)
or its own copy of its prompt (`shared_prompt`), and the prefix_shared sampler is refused.
"""

from __future__ import annotations

import torch
from torch import nn

from align.data.groups import pack_groups
from align.errors import AlignError
from align.models.packed import decoder_hidden

PACKED_ROWS = "packed rows"
SHARED_PROMPTS = "shared-prompt groups"


def layout_tolerance(dtype: torch.dtype) -> float:
    """Largest per-token relative difference of decoder states accepted: rounding only. Measured on
    tiny random models: fp32 ~1e-6, bf16 up to ~1.5e-2; a wrong layout is off by 0.5 or more."""
    return 1e-3 if dtype == torch.float32 else 0.2


def _relative_error(got: torch.Tensor, want: torch.Tensor) -> float:
    """max over tokens of |got - want| / |want| ([T, H] each, norms over H)."""
    got, want = got.float(), want.float()
    return ((got - want).norm(dim=-1) / want.norm(dim=-1).clamp_min(1e-12)).max().item()


@torch.no_grad()
def inexact_layouts(lm: nn.Module) -> dict[str, str]:
    """{layout: why} for Align's layouts (PACKED_ROWS, SHARED_PROMPTS) whose decoder states differ
    from the decoder's own forward() of each sequence alone; {} when both are exact.

    lm: a transformers model with `get_decoder()` (a causal LM or a sequence-classification model,
    adapters injected). Runs six forwards of at most 23 tokens in eval mode.
    """
    was_training = lm.training
    lm.eval()
    try:
        decoder = lm.get_decoder()
        embeddings = lm.get_input_embeddings()
        device = embeddings.weight.device
        generator = torch.Generator().manual_seed(0)
        first, second, prompt, branch_1, branch_2 = [
            torch.randint(0, embeddings.num_embeddings, (n,), generator=generator).tolist() for n in (13, 9, 11, 5, 7)]

        def alone(sequence: list[int]) -> torch.Tensor:  # [T, H]: the model's own forward, no position ids
            return decoder(input_ids=torch.tensor([sequence], device=device), use_cache=False).last_hidden_state[0]

        def packed() -> list[tuple[torch.Tensor, torch.Tensor]]:
            ids = torch.tensor([first + second], device=device)
            positions = torch.tensor([list(range(len(first))) + list(range(len(second)))], device=device)
            hidden = decoder_hidden(lm, ids, positions, None)[0]
            return [(hidden[:len(first)], alone(first)), (hidden[len(first):], alone(second))]

        def shared() -> list[tuple[torch.Tensor, torch.Tensor]]:
            # one row: [prompt[:-1] | prompt[-1] branch_1 | prompt[-1] branch_2]
            batch = pack_groups([(prompt, [branch_1, branch_2])], shared_prompt=True)
            hidden = decoder_hidden(lm, batch["input_ids"].to(device), batch["position_ids"].to(device),
                                    batch["attention_mask"].to(device))[0]
            start = len(prompt) - 1
            end_1 = start + 1 + len(branch_1)
            return [(hidden[:end_1], alone(prompt + branch_1)),
                    (hidden[end_1:end_1 + 1 + len(branch_2)], alone(prompt + branch_2)[start:])]

        prefix = f"model type {lm.config.model_type!r}: "
        out = {}
        for layout, pairs in ((PACKED_ROWS, packed), (SHARED_PROMPTS, shared)):
            try:
                compared = pairs()
            except AlignError as error:  # e.g. layers no mask applies to (`align.models.packed.layer_windows`)
                out[layout] = str(error)
                continue
            except Exception as error:  # noqa: BLE001 - any failure of the layout is a reason to refuse it
                out[layout] = f"{prefix}{layout} fail in its forward ({type(error).__name__}: {error})"
                continue
            error = max(_relative_error(got, want) for got, want in compared)
            tolerance = layout_tolerance(compared[0][1].dtype)
            if not error <= tolerance:
                out[layout] = (f"{prefix}{layout} give decoder states {error:.2g} (relative) away from the model's own "
                               f"forward() of each sequence alone (tolerance {tolerance}): its layers do not keep "
                               "each example apart by position ids and a mask")
        return out
    finally:
        lm.train(was_training)
