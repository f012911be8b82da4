"""Policy + critic for PPO: one module whose forward gives token log-probs and values.

The critic is either a value head on the policy's own backbone (`shared`: one forward serves
both) or a separate value model (a causal LM backbone with a one-scalar `score` head, e.g. started
from the reward model; it may carry its own LoRA/QLoRA adapter).
"""

from __future__ import annotations

import os

import torch
from safetensors.torch import save_file
from torch import nn

from align.models.head import logit_transform
from align.models.packed import decoder_hidden
from align.models.policy import Policy, ReferenceStrategy, causal_lm, unwrap
from align.ops.logprobs import token_logprobs


class ActorCritic(nn.Module):
    """forward(batch) -> (logps [B, T], values [B, T], entropy [B, T] or None).

    values[b, t] is the critic's estimate at position t, the state before the label token at t,
    so it lines up with logps. Both are read at labelled positions only by the caller.
    """

    def __init__(self, model: nn.Module, value_model: nn.Module | None = None):
        super().__init__()
        self.model = model
        self.value_model = value_model
        self.value_head = None
        if value_model is None:
            lm = causal_lm(model)
            self.value_head = nn.Linear(lm.config.hidden_size, 1)
            nn.init.normal_(self.value_head.weight, std=1 / (lm.config.hidden_size + 1))
            nn.init.zeros_(self.value_head.bias)
            self.value_head.to(lm.get_output_embeddings().weight.device)

    def forward(self, input_ids: torch.Tensor, labels: torch.Tensor, position_ids: torch.Tensor | None = None,
                attention_mask: torch.Tensor | None = None, temperature: float = 1.0, return_entropy: bool = False,
                label_positions: torch.Tensor | None = None, cu_seq_lens: torch.Tensor | None = None,
                max_seq_len: int | None = None, **_) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        lm = causal_lm(self.model)
        hidden = decoder_hidden(lm, input_ids, position_ids, attention_mask, cu_seq_lens, max_seq_len)
        out = token_logprobs(hidden, lm.get_output_embeddings(), labels, temperature=temperature,
                             return_entropy=return_entropy, transform=logit_transform(lm.config),
                             positions=label_positions)
        logps, entropy = out if return_entropy else (out, None)
        if self.value_head is not None:
            values = self.value_head(hidden.to(self.value_head.weight.dtype)).squeeze(-1)
        else:
            critic = causal_lm(self.value_model)
            values = critic.score(decoder_hidden(critic, input_ids, position_ids, attention_mask, cu_seq_lens,
                                                   max_seq_len)).squeeze(-1)
        return logps, values.float(), entropy


class ActorCriticPolicy(Policy):
    """A Policy whose trained module also holds the critic (see `ActorCritic`)."""

    def __init__(self, model: nn.Module, tokenizer, reference: ReferenceStrategy = "none",
                 value_model: nn.Module | None = None):
        self._value_model = value_model
        super().__init__(model, tokenizer, reference)
        if value_model is not None:  # the critic runs on the same batches
            self.probe_layouts(value_model)

    def wrap(self, model: nn.Module) -> nn.Module:
        return ActorCritic(model, self._value_model)

    def logprobs(self, batch: dict, temperature: float = 1.0, return_entropy: bool = False):
        logps, _, entropy = self.module(**batch, temperature=temperature, return_entropy=return_entropy)
        return (logps, entropy) if return_entropy else logps

    def logprobs_and_values(self, batch: dict, temperature: float = 1.0, return_entropy: bool = False):
        """(logps [B, T], values [B, T], entropy [B, T] or None), with gradient."""
        return self.module(**batch, temperature=temperature, return_entropy=return_entropy)

    def save(self, directory: str | os.PathLike, state_dict: dict[str, torch.Tensor] | None = None) -> None:
        """The policy as usual; the critic in `directory/critic` (a model dir, or the shared critic's
        value head as `value_head.safetensors`: weight [1, H], bias [1]). state_dict: the whole state
        of `self.module` gathered from FSDP shards (`sharding.full_state_dict`), else the modules' own."""
        def part(prefix: str) -> dict[str, torch.Tensor] | None:
            return None if state_dict is None else \
                {k.removeprefix(prefix): v for k, v in state_dict.items() if k.startswith(prefix)}

        super().save(directory, None if state_dict is None else {k: v for k, v in state_dict.items()
                                                                 if k.startswith("model.")})
        critic = unwrap(self.module)
        path = os.path.join(directory, "critic")
        os.makedirs(path, exist_ok=True)
        if critic.value_model is not None:
            critic.value_model.save_pretrained(path, state_dict=part("value_model."))
        else:
            head = critic.value_head.state_dict() if state_dict is None else part("value_head.")
            save_file({k: v.detach().contiguous().cpu() for k, v in head.items()},
                      os.path.join(path, "value_head.safetensors"))
