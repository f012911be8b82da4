"""Prompt groups packed with the prompt once equal the plain layout: log-probs and gradients."""

import torch

from align.config import AdapterConfig, ModelConfig
from align.data.groups import pack_groups, sequence_sums, sequence_tokens
from align.models import Policy


def _groups():
    return [([1, 5, 9, 12], [[20, 21, 22], [30], [40, 41]]),
            ([2, 7], [[50, 51, 52, 53], [60, 61]])]


def test_shared_prompt_groups_give_the_same_logprobs_and_gradients_as_separate_rows():
    policy = Policy.from_config(ModelConfig(name_or_path="builtin:tiny-llama", dtype="float32"), AdapterConfig())
    results = []
    for shared in (True, False):
        batch = pack_groups(_groups(), shared_prompt=shared)
        policy.module.zero_grad()
        logps = sequence_tokens(policy.logprobs(batch), batch["sequence_ids"], 5, 4)
        (logps * torch.arange(1, 5)).sum().backward()
        grads = torch.cat([p.grad.flatten() for p in policy.trainable_parameters()])
        results.append((logps.detach(), grads))
    (a, ga), (b, gb) = results
    torch.testing.assert_close(a, b, atol=1e-5, rtol=0)
    torch.testing.assert_close(ga, gb, atol=1e-5, rtol=1e-4)
    lengths = (a != 0).sum(-1)
    assert lengths.tolist() == [3, 1, 2, 4, 2]  # every completion token, EOS included, nothing else


def test_sequence_tokens_and_sums_place_each_token_in_its_row():
    batch = pack_groups(_groups(), shared_prompt=True)
    rows = sequence_tokens(batch["labels"].float(), batch["sequence_ids"], 5, 4)
    assert rows.tolist() == [[20, 21, 22, 0], [30, 0, 0, 0], [40, 41, 0, 0], [50, 51, 52, 53], [60, 61, 0, 0]]
    sums = sequence_sums(torch.ones(batch["labels"].shape), batch["sequence_ids"], 5)
    assert sums.tolist() == [3, 1, 2, 4, 2]
    assert batch["input_ids"][0, batch["last_index"]].tolist() == [22, 30, 41, 53, 61]
