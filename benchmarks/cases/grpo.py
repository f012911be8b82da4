"""GRPO: G=8 completions of 64 new tokens per prompt, prompts of ~60-180 tokens (chat).

Both sides sample with temperature 1 from the same random 32k-vocabulary model, so nearly every
completion runs to max_new_tokens (EOS is one id in 32000): the work is the same on both sides
even though the samples are not. The reward is a cheap function of the decoded text (its length),
identical on both sides. Defaults on both: beta 0 (no reference model), one iteration per rollout
(no old-log-prob forward), DAPO token normalisation, group-scaled advantages, epsilon 0.2.

Align: the prefix-shared sampler (each prompt prefilled once for its G samples, finished rows leave
the batch) and the shared-prompt training forward. TRL: GRPOTrainer without vLLM
(`transformers.generate` on G copies of each prompt, then a padded training forward).

The final models cannot agree on a held-out loss: each side trains on its own samples. The
comparison is valid when both did the same work: the same optimizer steps, the same number of
completions and the same completion tokens within 2% (`benchmarks/report.py`). That the two
GRPO losses are the same function is tested in tests/test_losses_policy_gradient.py.
"""

from __future__ import annotations

import random

import torch
import torch.nn.functional as F

from benchmarks.common import (Prepared, Spec, align_job, align_recipe, device, fastest_adamw, floor_forward,
                               hf_dataset, load_rows, trl_args, trl_job)
from benchmarks.steps import step_done

VARIANTS = ("default",)
BASELINE = "TRL"
ALGORITHM = "grpo"
MODEL = "lm"
COMPARE = "work"


def prompt_rows(n: int, seed: int, context_lines: tuple[int, int] = (2, 10)) -> list[dict]:
    """Chat prompts: a few worked examples, then a question (~60-180 tokens with the template)."""
    from align.toy import arithmetic_question, solution

    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        examples = [solution(*arithmetic_question(rng)) for _ in range(rng.randint(*context_lines))]
        question, answer = arithmetic_question(rng)
        content = "Worked examples:\n" + "\n".join(examples) + f"\nNow solve: {question}"
        rows.append({"prompt": [{"role": "user", "content": content}], "answer": str(answer)})
    return rows


def data(n_train: int, n_eval: int, context_lines=(2, 10)) -> tuple[list[dict], list[dict]]:
    return prompt_rows(n_train, 41, context_lines), prompt_rows(n_eval, 42, context_lines)


def length_reward(completions, **kwargs) -> list[float]:
    """Characters of the decoded completion / 100 (TRL passes chat completions as message lists)."""
    texts = [c if isinstance(c, str) else c[-1]["content"] for c in completions]
    return [len(t) / 100 for t in texts]


def initial_model(spec: Spec):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(spec.model_dir, dtype=torch.float32)


def align_settings(spec: Spec) -> dict:
    return {"group_size": spec.group_size, "beta": spec.beta,
            "sampling": {"max_new_tokens": spec.max_new_tokens, "temperature": 1.0},
            "rewards": [{"fn": "benchmarks.cases.grpo:length_reward"}]}


def align(spec: Spec) -> Prepared:
    from align.trainers.grpo import GRPOTrainer

    return align_job(GRPOTrainer, align_recipe(spec, ALGORITHM, grpo=align_settings(spec)))


def trl(spec: Spec) -> Prepared:
    from transformers import AutoTokenizer
    from trl import GRPOConfig, GRPOTrainer

    work = {"completions": 0, "completion_tokens": 0}

    class CountingGRPOTrainer(GRPOTrainer):
        def _generate_and_score_completions(self, inputs):
            output = super()._generate_and_score_completions(inputs)
            work["completions"] += len(output["completion_mask"])
            work["completion_tokens"] += int(output["completion_mask"].sum())
            return output

    tokenizer = AutoTokenizer.from_pretrained(spec.model_dir)
    args = GRPOConfig(**trl_args(spec), num_generations=spec.group_size, max_completion_length=spec.max_new_tokens,
                      temperature=1.0, beta=spec.beta)
    trainer = CountingGRPOTrainer(model=initial_model(spec), reward_funcs=length_reward, args=args,
                                  train_dataset=hf_dataset(spec.train_path), processing_class=tokenizer)
    prepared = trl_job(trainer)
    prepared.work = lambda: dict(work)
    return prepared


# ---- the floor -----------------------------------------------------------------------------------
@torch.no_grad()
def sample(model, prompts: list[list[int]], spec: Spec) -> list[list[int]]:
    """The least a sampler must do: prefill the N prompts once (left-padded), repeat the cache G
    times (G = spec.group_size), decode spec.max_new_tokens steps for all N*G rows (no stopping).
    -> N*G completions."""
    from transformers import DynamicCache

    from align.rollout.sampling import sample_categorical, with_cache

    length = max(len(p) for p in prompts)
    ids = torch.tensor([[p[0]] * (length - len(p)) + p for p in prompts], device=device())
    mask = torch.tensor([[0] * (length - len(p)) + [1] * len(p) for p in prompts], device=device())
    cache = DynamicCache(config=model.config)
    with floor_forward(spec):
        logits = model(input_ids=ids, attention_mask=mask, position_ids=(mask.cumsum(-1) - 1).clamp(min=0),
                       logits_to_keep=1, **with_cache(model, cache)).logits[:, -1]
    cache.batch_repeat_interleave(spec.group_size)
    logits, mask = logits.repeat_interleave(spec.group_size, 0), mask.repeat_interleave(spec.group_size, 0)
    positions = mask.sum(-1, keepdim=True)
    tokens = []
    for step in range(spec.max_new_tokens):
        token = sample_categorical(torch.softmax(logits.float(), -1))[:, None]  # the fastest exact sampler we know
        tokens.append(token)
        if step == spec.max_new_tokens - 1:
            break
        mask = torch.cat([mask, torch.ones_like(token)], 1)
        with floor_forward(spec):
            logits = model(input_ids=token, attention_mask=mask, position_ids=positions + step,
                           **with_cache(model, cache)).logits[:, -1]
    return torch.cat(tokens, 1).tolist()


def floor(spec: Spec, model, tokenizer) -> Prepared:
    """Per optimizer step: sample the step's prompts (bare sampler above), then forward+backward
    its micro-batches as shared-prompt packed groups (Align's layout), the lm-head on completion
    tokens only, loss -sum(advantage * logp) / completion tokens, then AdamW. Random advantages:
    the floor scores nothing."""
    from align.data.groups import pack_groups

    model.to(device()).train()
    optimizer = fastest_adamw(model, spec.lr)
    prompts = [list(tokenizer.apply_chat_template(r["prompt"], tokenize=True, return_dict=True,
                                                  add_generation_prompt=True)["input_ids"])
               for r in load_rows(spec.train_path)]
    g = spec.group_size
    per_step, per_batch = spec.batch_size * spec.grad_accum // g, spec.batch_size // g
    work = {"completions": 0, "completion_tokens": 0}

    def train():
        for start in range(0, len(prompts), per_step):
            step_prompts = prompts[start:start + per_step]
            model.eval()
            completions = sample(model, step_prompts, spec)
            model.train()
            work["completions"] += len(completions)
            work["completion_tokens"] += sum(len(c) for c in completions)
            num_items = sum(len(c) for c in completions)
            for b in range(0, len(step_prompts), per_batch):
                groups = [(p, completions[(b + i) * g:(b + i + 1) * g]) for i, p in enumerate(step_prompts[b:b + per_batch])]
                batch = {k: v.to(device()) if isinstance(v, torch.Tensor) else v for k, v in pack_groups(groups).items()}
                with floor_forward(spec):
                    hidden = model.model(input_ids=batch["input_ids"], position_ids=batch["position_ids"],
                                         attention_mask=batch["attention_mask"]).last_hidden_state
                    labelled = batch["labels"] != -100
                    logits = model.lm_head(hidden[labelled]).float()
                logps = -F.cross_entropy(logits, batch["labels"][labelled], reduction="none")
                advantages = torch.randn(len(groups) * g, device=logps.device)[batch["sequence_ids"][labelled]]
                (-(advantages * logps).sum() / num_items).backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            step_done()

    return Prepared(train=train, model=lambda: model, steps=lambda: -(-len(prompts) // per_step),
                    work=lambda: dict(work))


def heldout(spec: Spec, model, tokenizer) -> None:
    """No held-out loss: the sides train on different samples (see the module docstring)."""
    return None
