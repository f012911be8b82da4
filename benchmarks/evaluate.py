"""Held-out losses, computed by the harness itself with the same code on every final model.

Each runs in fp32, without autocast, one padded batch at a time with an attention mask, through
the plain transformers forward, so it shares nothing with either trainer's training code path.
Tokenization is the tokenizer's own (chat template with assistant masks; prompt and completion
tokenized apart, the completion ending with EOS), which is what both frameworks produce on this data.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def plain(model: torch.nn.Module) -> torch.nn.Module:
    """`model` with its class's own forward, so every held-out pass runs as the module says (fp32).

    A trainer may leave wrappers of that forward on the instance: TRL's SFT trainer its fused
    lm-head (which calls the plain forward unless asked), accelerate's mixed precision (TRL's
    `bf16=True`) one under bf16 autocast that stays after `train()`. TRL's final model was then
    evaluated in bf16, where a 1e-5 learning rate's updates, below bf16's resolution, do not show,
    and Align's in fp32: that made the GPU's 0.5b SFT and reward-model rows VOID. A replacement
    whose `__wrapped__` chain leads to the class's forward is removed; any other is an error."""
    replaced = model.__dict__.get("forward")
    if replaced is not None:
        fn = getattr(replaced, "__func__", replaced)
        for _ in range(32):  # (a chain of wrappers, each naming the one it wraps)
            if fn is type(model).forward or not hasattr(fn, "__wrapped__"):
                break
            fn = getattr(fn.__wrapped__, "__func__", fn.__wrapped__)
        if fn is not type(model).forward:
            raise ValueError(f"{type(model).__name__}'s forward is replaced on the instance by {replaced!r}, which "
                             "does not wrap the class's own: the held-out passes evaluate the class's forward")
        del model.__dict__["forward"]
    model.__dict__.pop("_original_forward", None)  # (accelerate's note of what it wrapped)
    return model


def model_device(model) -> torch.device:
    """Where the model's weights are: every batch goes there (the model may sit on the CPU while a
    GPU is present, e.g. the initial model of a floor job, or on the GPU after training)."""
    return next(model.parameters()).device


def _padded(seqs: list[list[int]], pad_id: int, device: torch.device):
    """ -> input_ids [B, T], attention_mask [B, T] on `device`"""
    length = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), length), pad_id)
    mask = torch.zeros((len(seqs), length), dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, :len(s)] = torch.tensor(s)
        mask[i, :len(s)] = 1
    return ids.to(device), mask.to(device)


@torch.no_grad()
def token_logprobs(model, seqs: list[list[int]], pad_id: int) -> list[torch.Tensor]:
    """Log-prob of each token given its prefix: one [len(s) - 1] tensor per sequence."""
    ids, mask = _padded(seqs, pad_id, model_device(model))
    logits = model(input_ids=ids, attention_mask=mask, use_cache=False).logits.float()
    logits = logits[:, :-1]  # no second [B, T, vocab] tensor: a 151k vocabulary on a GPU makes it ~10 GB
    logps = logits.gather(-1, ids[:, 1:, None])[..., 0] - torch.logsumexp(logits, -1)
    return [logps[i, :len(s) - 1].cpu() for i, s in enumerate(seqs)]


def chat_examples(tokenizer, rows: list[dict]) -> list[tuple[list[int], list[bool]]]:
    out = []
    for row in rows:
        enc = tokenizer.apply_chat_template(row["messages"], tokenize=True, return_dict=True,
                                            return_assistant_tokens_mask=True)
        out.append((list(enc["input_ids"]), [bool(m) for m in enc["assistant_masks"]]))
    return out


def sft_loss(model, tokenizer, rows: list[dict], batch_size: int = 8) -> float:
    """Mean NLL per assistant token over the held-out chats."""
    examples = chat_examples(tokenizer, rows)
    total, count = 0.0, 0
    model.eval()
    for start in range(0, len(examples), batch_size):
        chunk = examples[start:start + batch_size]
        for logps, (_, trained) in zip(token_logprobs(model, [ids for ids, _ in chunk], tokenizer.pad_token_id), chunk):
            keep = torch.tensor(trained[1:])
            total -= float(logps[keep].sum())
            count += int(keep.sum())
    return total / count


def pair_tokens(tokenizer, row: dict) -> tuple[list[int], list[int], list[int]]:
    prompt = list(tokenizer(row["prompt"])["input_ids"])
    eos = [tokenizer.eos_token_id]
    return (prompt, list(tokenizer(row["chosen"], add_special_tokens=False)["input_ids"]) + eos,
            list(tokenizer(row["rejected"], add_special_tokens=False)["input_ids"]) + eos)


@torch.no_grad()
def completion_logps(model, tokenizer, rows: list[dict], batch_size: int = 8) -> torch.Tensor:
    """[N, 2] summed log-probs of the (chosen, rejected) completions given the prompt."""
    model.eval()
    out = []
    for start in range(0, len(rows), batch_size):
        triples = [pair_tokens(tokenizer, r) for r in rows[start:start + batch_size]]
        seqs = [p + c for p, c, _ in triples] + [p + r for p, _, r in triples]
        prompts = [len(p) for p, _, _ in triples] * 2
        logps = token_logprobs(model, seqs, tokenizer.pad_token_id)
        sums = torch.stack([lp[n - 1:].sum() for lp, n in zip(logps, prompts)])
        out.append(torch.stack(sums.chunk(2), -1))
    return torch.cat(out)


def dpo_loss(model, reference_logps: torch.Tensor, tokenizer, rows: list[dict], beta: float) -> float:
    """Mean sigmoid DPO loss of `model` against precomputed reference (chosen, rejected) log-probs."""
    policy = completion_logps(model, tokenizer, rows)
    h = (policy[:, 0] - reference_logps[:, 0]) - (policy[:, 1] - reference_logps[:, 1])
    return float(-F.logsigmoid(beta * h).mean())


@torch.no_grad()
def reward_loss(model, tokenizer, rows: list[dict], batch_size: int = 8) -> float:
    """Mean Bradley-Terry loss of a sequence-classification reward model on held-out pairs."""
    model.eval()
    losses = []
    for start in range(0, len(rows), batch_size):
        triples = [pair_tokens(tokenizer, r) for r in rows[start:start + batch_size]]
        seqs = [p + c for p, c, _ in triples] + [p + r for p, _, r in triples]
        ids, mask = _padded(seqs, tokenizer.pad_token_id, model_device(model))
        scores = model(input_ids=ids, attention_mask=mask, use_cache=False).logits[:, 0].float()
        chosen, rejected = scores.chunk(2)
        losses.append(-F.logsigmoid(chosen - rejected).cpu())
    return float(torch.cat(losses).mean())
