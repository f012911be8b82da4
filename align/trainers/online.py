"""What GRPO and PPO share: prompt data, rollout rounds, reward functions and experience batches.

Every optimizer step belongs to a *round*. The first step of a round samples completions for the
round's prompts, scores them and keeps the result (`make_experience`); the round's
`steps_per_round` optimizer steps then train on it (GRPO: num_iterations passes over all of it;
PPO: ppo_epochs x num_mini_batches). The prompts of round r are a pure function of the seed and r,
and a checkpoint taken mid-round holds the round's experience, so a resumed run continues the
same run.

Under several processes each process samples, scores and annotates its share of the round's
prompts (whole groups); the results are then gathered, so every process holds the whole round's
experience, in prompt order, and advantages, whitening and metrics use the whole round. Each
optimizer step's groups are then shared out like any step's examples (`share_micro_batches`).

Experience is kept per prompt group: {"prompt_ids", "completions": [G id lists], "trained": [G]
bool} plus per-sequence values ([G] tensors, e.g. advantages) and per-token values (lists of G
[L_i] tensors, e.g. old log-probs). `collate` packs groups with the prompt computed once and pads
the per-sequence values to [S, T].
"""

from __future__ import annotations

import contextlib
import logging
import math
import time

import torch
from torch.nn.utils.rnn import pad_sequence

from align.data.groups import group_tokens, pack_groups, sequence_tokens
from align.data.prompts import tokenize_prompts
from align.errors import AlignError
from align.losses.policy_gradient import nan_std
from align.models import sharding, zero
from align.models.layouts import check_rope_lengths
from align.models.reward import RewardScorer
from align.rewards import RewardFunctions
from align.rewards.calling import PROMPT_COLUMNS
from align.rollout import Rollout, SamplingParams, make_engine
from align.rollout.sampling import eos_token_ids
from align.trainers import samples
from align.trainers.base import Trainer
from align.distributed import gather_shares, map_in_shares, shard

log = logging.getLogger(__name__)


class OnlineTrainer(Trainer):
    formats = ("prompt", "prompt_completion")
    dropout_by_default = False  # old and reference log-probs must see the model the update trains
    shares_prompts = True

    # ---- settings -------------------------------------------------------------------------------
    @classmethod
    def settings(cls, recipe):
        """The algorithm's recipe section (recipe.grpo / recipe.ppo)."""
        return getattr(recipe, cls.algorithm)

    @property
    def rl(self):
        return self.settings(self.recipe)

    def samples_in_process(self) -> bool:
        """True unless a rollout server samples (`sampling.engine: server`)."""
        return self.rl.sampling.engine != "server"

    @property
    def group_size(self) -> int:
        return 1

    @property
    def mini_batches(self) -> int:
        """Optimizer steps that split one pass over a round's experience."""
        return 1

    @property
    def steps_per_round(self) -> int:
        raise NotImplementedError

    @property
    def prompts_per_round(self) -> int:
        return self.global_batch_size * self.mini_batches // self.group_size

    @property
    def rounds_per_epoch(self) -> int:
        return math.ceil(len(self.train_data) / self.prompts_per_round)

    @property
    def logprob_temperature(self) -> float:
        """Log-probs are taken at the sampling temperature, so ratios compare like with like."""
        return self.rl.sampling.temperature or 1.0

    @classmethod
    def check_recipe(cls, recipe) -> None:
        """Settings that must agree before anything loads."""

    # ---- construction ---------------------------------------------------------------------------
    @classmethod
    def load_splits(cls, recipe):
        cls.check_recipe(recipe)
        return super().load_splits(recipe)

    @classmethod
    def build_dataset(cls, recipe, tokenizer, rows, fmt, key):
        sampling = cls.settings(recipe).sampling
        limit = sampling.max_prompt_length or recipe.data.max_length
        setting = f"{cls.algorithm}.sampling.max_prompt_length" if sampling.max_prompt_length else "data.max_length"
        return tokenize_prompts(rows, tokenizer, limit, key, setting, recipe.data.num_proc)

    def count_steps_per_epoch(self) -> int:
        self.check_recipe(self.recipe)
        return self.rounds_per_epoch * self.steps_per_round

    def prepare_data(self) -> None:
        """Reward functions and the rollout engine; then every reward is tried once on real samples."""
        self.rewards = RewardFunctions.from_config(self.rl.rewards, key=f"{self.algorithm}.rewards")
        self.rewards.match_policy(self.policy.tokenizer, self.eos_ids)
        longest, setting = self.longest_sequence
        for fn, key in zip(self.rewards.functions, self.rewards.keys):
            if isinstance(fn, RewardScorer):  # (it packs prompt + completion pairs into one row)
                check_rope_lengths(fn.reward_model.module, longest, setting, f"the reward model {key}")
        self.start_engine()
        rows = [self.train_data[i] for i in range(min(2, len(self.train_data)))]
        params = self.sampling_params(seed=self.cfg.seed, max_new_tokens=min(16, self.rl.sampling.max_new_tokens))
        rollout = self.engine.generate([r["prompt_ids"] for r in rows], params, 1)
        self.rewards.dry_run(*self.reward_inputs(rows, rollout))

    def start_engine(self) -> None:
        """The rollout engine, sampling from the policy's model (under fsdp or ZeRO-3 its unsharded copy), and
        no experience yet."""
        sampling = self.rl.sampling
        longest, _ = self.longest_sequence
        model = self.policy.model if self.sampling_copy is None else self.sampling_copy
        with self.whole_policy():  # a server engine is sent the weights at once
            self.engine = make_engine(sampling.engine, model, self.policy.tokenizer, sampling, longest)
        self.experience: dict | None = None

    @property
    def longest_sequence(self) -> tuple[int, str]:
        """A prompt and its completion: the most tokens one sequence holds."""
        sampling = self.rl.sampling
        prompt = "sampling.max_prompt_length" if sampling.max_prompt_length else "data.max_length"
        return ((sampling.max_prompt_length or self.recipe.data.max_length) + sampling.max_new_tokens,
                f"{prompt} + {self.algorithm}.sampling.max_new_tokens")

    @property
    def eos_ids(self) -> list[int]:
        """The ids that end the policy's completions (`eos_token_ids`: its tokenizer's EOS, its
        generation config's, the chat template's end of turn where none of those closes a reply)."""
        return eos_token_ids(self.policy.tokenizer, self.policy.model)

    def sampling_params(self, **overrides) -> SamplingParams:
        s = self.rl.sampling
        params = dict(max_new_tokens=s.max_new_tokens, temperature=s.temperature, top_p=s.top_p, top_k=s.top_k,
                      min_p=s.min_p, repetition_penalty=s.repetition_penalty, stop=list(s.stop))
        return SamplingParams(**{**params, **overrides})

    # ---- rounds ---------------------------------------------------------------------------------
    def round_rows(self, round_: int) -> list[dict]:
        """The prompt rows of round `round_` (a pure function of seed and round)."""
        epoch, k = divmod(round_, self.rounds_per_epoch)
        order = torch.randperm(len(self.train_data), generator=torch.Generator().manual_seed(self.cfg.seed + epoch))
        size = self.prompts_per_round
        return [self.train_data[int(i)] for i in order[k * size:(k + 1) * size]]

    def micro_batches(self, step: int) -> list[dict]:
        round_, index = divmod(step, self.steps_per_round)
        if self.experience is None or self.experience["round"] != round_:
            self.experience = self.make_experience(round_)
        groups = self.step_groups(self.experience["groups"], round_, index)
        return self.share_micro_batches(groups, self.cfg.batch_size // self.group_size)

    def step_groups(self, groups: list[dict], round_: int, index: int) -> list[dict]:
        """The groups optimizer step `index` of the round trains on. Default: all of them."""
        return groups

    def train_step(self, micro_batches: list[dict]) -> dict[str, float]:
        record = super().train_step(micro_batches)
        record.update(self.experience["metrics"])
        return record

    # ---- experience -----------------------------------------------------------------------------
    def make_experience(self, round_: int) -> dict:
        """Sample, score and annotate the completions of round `round_`."""
        rows = self.round_rows(round_)
        start = time.perf_counter()
        rollout, values = self.sample_and_score(rows, round_)
        seconds = time.perf_counter() - start
        scores = self.rewards.combine(values)  # NaN: no reward function scored the completion
        groups = self.build_groups(rows, rollout, scores)
        metrics = {**self.rollout_metrics(rollout, seconds), **self.rewards.metrics(values)}
        scored = scores[~scores.isnan()]
        if len(scored):  # as TRL: over the scored completions; reward_std is unbiased
            metrics.update(reward=scored.mean().item(), reward_std=scored.std().item() if len(scored) > 1 else 0.0)
        if self.group_size > 1:  # a group with fewer than two scored rewards has no std (TRL: not zero)
            std = nan_std(scores.view(-1, self.group_size), dim=1)
            metrics["frac_reward_zero_std"] = torch.isclose(std, torch.zeros_like(std)).float().mean().item()
        metrics.update(self.annotate(groups))
        return {"round": round_, "groups": groups, "metrics": metrics}

    def sample_and_score(self, rows: list[dict], round_: int) -> tuple[Rollout, torch.Tensor]:
        """The rollout of `rows` and its [N*G, F] reward values: each process samples and scores its
        share of the prompts (its own sampling seed), then every process gets all of it."""
        g, mine = self.group_size, shard(rows)
        self.sync_sampler()
        per_prompt = []
        if mine:
            seed = self.cfg.seed * 1_000_003 + round_ + 1_000_000_007 * self.accelerator.process_index
            rollout = self.engine.generate([r["prompt_ids"] for r in mine], self.sampling_params(seed=seed), g)
            values = self.score(mine, rollout)
            per_prompt = [(rollout.completion_ids[i * g:(i + 1) * g], rollout.finished[i * g:(i + 1) * g],
                           values[i * g:(i + 1) * g]) for i in range(len(mine))]
        else:  # no prompts here this round (its last, short one)
            self.score_nothing()
        per_prompt = gather_shares(per_prompt)
        rollout = Rollout([r["prompt_ids"] for r in rows], [c for p in per_prompt for c in p[0]],
                          [f for p in per_prompt for f in p[1]], g)
        return rollout, torch.cat([p[2] for p in per_prompt])

    def sync_sampler(self) -> None:
        """Make the engine sample from the current weights: under fsdp or ZeRO-3 the unsharded sampling
        copy gets them from the shards (every process calls this: a collective); engines outside the
        trained modules (vLLM, a rollout server) are sent them (a server: from the shards, gathered)."""
        if self.sampling_copy is not None and self.zero_engine is not None:
            zero.copy_weights(self.zero_engine, self.sampling_copy)
        elif self.sampling_copy is not None:
            sharding.copy_weights(self.policy.module, self.sampling_copy)
        with self.whole_policy():
            self.engine.sync_weights()

    def whole_policy(self):
        """Under fsdp or ZeRO-3 with a rollout server: a context in which every process holds the
        policy's whole weights (`sharding.gathered`, `zero.gathered_weights`: collectives), for the main
        process to send. Else nothing."""
        if self.samples_in_process():
            return contextlib.nullcontext()
        if self.sharded:
            return sharding.gathered(self.policy.module)
        if self.zero_engine is not None:
            return zero.gathered_weights(self.zero_engine.module.model)  # the policy's (not PPO's critic)
        return contextlib.nullcontext()

    def score(self, rows: list[dict], rollout: Rollout) -> torch.Tensor:
        """[N*G, F] rewards of every completion from every reward function (NaN = not applicable)."""
        return self.rewards(*self.reward_inputs(rows, rollout))

    def score_nothing(self) -> None:
        """What `score` does on a process with no completions while the others score theirs: the
        collectives it would run (a sharded reward model's forwards), so that every process runs as many."""
        if self.rewards.sharded:
            self.rewards.pad_sharded()

    def reward_inputs(self, rows: list[dict], rollout: Rollout) -> tuple:
        """(prompts, completions, completion_ids, columns) for the reward functions: prompts as in the
        data, completions decoded, every other dataset column repeated for each completion."""
        n, g = len(rollout.completion_ids), rollout.group_size
        completions = self.policy.tokenizer.batch_decode(rollout.completion_ids, skip_special_tokens=True)
        prompts = [rows[i // g]["prompt"] for i in range(n)]
        columns = {key: [rows[i // g][key] for i in range(n)] for key in rows[0] if key not in PROMPT_COLUMNS}
        return prompts, completions, rollout.completion_ids, columns

    def build_groups(self, rows: list[dict], rollout: Rollout, scores: torch.Tensor) -> list[dict]:
        """Experience groups for the algorithm (advantages and the like). scores: [N*G]."""
        raise NotImplementedError

    def annotate(self, groups: list[dict]) -> dict[str, float]:
        """Add per-token values computed without gradient (old / reference log-probs, values)."""
        return {}

    def rollout_metrics(self, rollout: Rollout, seconds: float) -> dict[str, float]:
        """Completion lengths, the share cut at max_new_tokens, and rollout_tokens_per_s: completion
        tokens per second of the whole rollout, `seconds` (sampling and scoring, reward models and
        slow reward functions included)."""
        lengths = torch.tensor([len(c) for c in rollout.completion_ids], dtype=torch.float)
        return {"completions/mean_length": lengths.mean().item(), "completions/min_length": lengths.min().item(),
                "completions/max_length": lengths.max().item(),
                "completions/clipped_ratio": 1.0 - sum(rollout.finished) / len(rollout.finished),
                "rollout_tokens_per_s": lengths.sum().item() / max(seconds, 1e-9)}

    @torch.no_grad()
    def forward_groups(self, groups: list[dict], fn) -> None:
        """Run `fn(batch) -> {name: [1, N] packed per-token values}` over the groups in micro-batches,
        without gradient, and store each as group[name] = its G per-sequence [L_i] tensors (CPU).
        Each process runs its share of the groups; every process then gets all the values."""
        def values_of(chunk: list[dict]) -> list[dict]:  # {name: G tensors [L_i]} per group
            batch = self._to_device(self.collate(chunk))
            with self.autocast():
                outputs = fn(batch)
            values: list[dict] = [{} for _ in chunk]
            for name, packed in outputs.items():
                rows = iter(sequence_tokens(packed.float(), batch["sequence_ids"], *batch["mask"].shape).cpu())
                for value, group in zip(values, chunk):
                    value[name] = [next(rows)[:len(c)] for c in group["completions"]]
            return values

        per_batch = max(1, (self.cfg.eval_batch_size or self.cfg.batch_size) // self.group_size)
        with self.scoring_mode():
            for group, value in zip(groups, map_in_shares(groups, per_batch, values_of, even=self.lockstep)):
                group.update(value)

    def item_tokens(self, group) -> int:
        return group_tokens(len(group["prompt_ids"]), [len(c) for c in group["completions"]], self.shared_prompt)

    def collate(self, groups: list[dict]) -> dict[str, torch.Tensor]:
        """Groups -> packed batch (prompt once per group) + mask [S, T] and per-sequence values
        ([S] or padded [S, T])."""
        batch = pack_groups([(g["prompt_ids"], g["completions"]) for g in groups], self.shared_prompt,
                            packed=self.packs_rows)
        lengths = torch.tensor([len(c) for g in groups for c in g["completions"]])
        trained = torch.tensor([t for g in groups for t in g["trained"]])
        batch["mask"] = ((torch.arange(int(lengths.max()))[None] < lengths[:, None]) & trained[:, None]).float()
        for key, value in groups[0].items():
            if isinstance(value, torch.Tensor):
                batch[key] = torch.cat([g[key] for g in groups])
            elif key not in ("prompt_ids", "completions", "trained"):
                batch[key] = pad_sequence([t for g in groups for t in g[key]], batch_first=True)
        return batch

    # ---- evaluation and checkpoints -------------------------------------------------------------
    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        """Greedy completions for every eval prompt (shared out among the processes), scored by the
        reward functions: eval/reward, eval/rewards/<name>/mean, ... With train.eval_samples = k > 0,
        also k completions per prompt sampled at the training settings with a fixed seed (so that
        evaluations compare): their mean reward is eval/reward_sampled (per function
        eval/rewards/<name>/mean_sampled). GRPO optimizes the sampled reward; the greedy one can move
        the other way. The first samples.SHOWN greedy completions, with their rewards, go to OUTPUT_DIR/samples.jsonl."""
        greedy, k = self.sampling_params(temperature=0.0, seed=0), self.cfg.eval_samples

        def scored(indices) -> list[tuple]:  # per prompt: (values [F], length, text or None, sampled [k, F] or None)
            rows = [self.eval_data[i] for i in indices]
            prompts = [r["prompt_ids"] for r in rows]
            rollout = self.engine.generate(prompts, greedy, 1)
            texts = [self.policy.tokenizer.decode(c, skip_special_tokens=True) if i < samples.SHOWN else None
                     for i, c in zip(indices, rollout.completion_ids)]
            sampled = [None] * len(rows)
            if k:  # the seed depends on the chunk only, not on the step: every evaluation draws alike
                params = self.sampling_params(seed=self.cfg.seed * 1_000_003 + 999_999_937 + int(indices[0]))
                sampled = list(self.score(rows, self.engine.generate(prompts, params, k)).view(len(rows), k, -1))
            return list(zip(self.score(rows, rollout), map(len, rollout.completion_ids), texts, sampled))

        self.sync_sampler()
        results = map_in_shares(range(len(self.eval_data)), self.cfg.eval_batch_size or self.cfg.batch_size, scored,
                                even=self.rewards.sharded)  # a sharded reward model: as many calls on each process
        values, lengths = torch.stack([r[0] for r in results]), [r[1] for r in results]
        combined = self.rewards.combine(values)  # NaN where no function scored the completion
        metrics = {"completions/mean_length": sum(lengths) / len(lengths), **self.rewards.metrics(values)}
        if not combined.isnan().all():
            metrics["reward"] = combined.nanmean().item()
        if k:
            sampled = torch.cat([r[3] for r in results])  # [N*k, F]
            sampled_combined = self.rewards.combine(sampled)
            if not sampled_combined.isnan().all():
                metrics["reward_sampled"] = sampled_combined.nanmean().item()
            metrics.update({f"{key}_sampled": value for key, value in self.rewards.metrics(sampled).items()
                            if key.endswith("/mean")})
        self.show_samples([self.sample(self.eval_data[i], r[2], r[0], combined[i])
                           for i, r in enumerate(results[:samples.SHOWN])])
        return {f"eval/{key}": value for key, value in metrics.items() if not key.endswith("/std")}

    def sample(self, row: dict, completion: str, values: torch.Tensor, reward: torch.Tensor) -> dict:
        """An eval sample as samples.jsonl holds it: {"prompt", "completion", "rewards": {name: value},
        "reward"} (None where no function scored it)."""
        def number(value: torch.Tensor) -> float | None:
            return None if value.isnan() else value.item()

        return {"prompt": row["prompt"], "completion": completion,
                "rewards": dict(zip(self.rewards.names, map(number, values))), "reward": number(reward)}

    def checkpoint_state(self) -> dict[str, object]:
        state = super().checkpoint_state()
        if self.experience is not None and self.step % self.steps_per_round:
            state["experience"] = self.experience  # mid-round: the rest of the round trains on it
        return state

    def restore_state(self, objects: dict[str, object]) -> None:
        super().restore_state(objects)
        self.experience = objects.get("experience")


def check_divisible(batch_size: int, group_size: int, key: str) -> None:
    if batch_size % group_size:
        lower = max(group_size, batch_size - batch_size % group_size)
        raise AlignError(f"train.batch_size={batch_size} is not a multiple of {key}={group_size}: a micro-batch "
                         f"holds whole groups of completions; use train.batch_size={lower} or "
                         f"{lower + group_size}")
