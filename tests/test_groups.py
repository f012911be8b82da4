"""Prompt groups packed with the prompt once equal the plain layout: log-probs and gradients."""

import pytest
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
    assert batch["input_ids"].flatten()[batch["last_index"]].tolist() == [22, 30, 41, 53, 61]


def test_groups_fill_rows_no_longer_than_the_longest_group_in_any_order():
    """Best-fit decreasing puts the longer second group in row 0; a budget packs both in one row; every
    layout gives the same per-sequence log-probs and gradients (padding attends only to itself), a row
    per sequence with its padding mask too (`packed=False`)."""
    groups = [([2, 7], [[50, 51], [60]]), ([1, 5, 9, 12], [[20, 21, 22], [30], [40, 41]])]
    policy = Policy.from_config(ModelConfig(name_or_path="builtin:tiny-llama", dtype="float32"), AdapterConfig())
    results = []
    for shared, budget, rows, packed in [(True, None, 2, True), (True, 64, 1, True), (False, None, 4, True),
                                         (False, 64, 1, True), (False, None, 5, False)]:
        batch = pack_groups(groups, shared_prompt=shared, max_length=budget, packed=packed)
        assert batch["input_ids"].shape[0] == rows
        if not packed:
            assert batch["attention_mask"].sum(-1).tolist() == [4, 3, 7, 5, 6]
        assert batch["num_tokens"] == (6 + 12 if shared else 4 + 3 + 7 + 5 + 6)
        tokens = sequence_tokens(batch["labels"].float(), batch["sequence_ids"], 5, 4)
        assert tokens.tolist() == [[50, 51, 0, 0], [60, 0, 0, 0], [20, 21, 22, 0], [30, 0, 0, 0], [40, 41, 0, 0]]
        assert batch["input_ids"].flatten()[batch["last_index"]].tolist() == [51, 60, 22, 30, 41]
        policy.module.zero_grad()
        logps = sequence_tokens(policy.logprobs(batch), batch["sequence_ids"], 5, 4)
        (logps * torch.arange(1, 5)).sum().backward()
        results.append((logps.detach(), torch.cat([p.grad.flatten() for p in policy.trainable_parameters()])))
    for logps, grads in results[1:]:
        torch.testing.assert_close(logps, results[0][0], atol=1e-5, rtol=0)
        torch.testing.assert_close(grads, results[0][1], atol=1e-5, rtol=1e-4)
    with pytest.raises(ValueError, match="a shared prompt needs its branches packed"):
        pack_groups(groups, shared_prompt=True, packed=False)
