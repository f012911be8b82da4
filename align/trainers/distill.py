"""On-policy distillation (`algorithm: distill`): the student (the policy) samples completions for
the prompts, a frozen teacher scores every completion token, and the loss is the per-token
divergence between the two next-token distributions over the FULL vocabulary: the reverse KL
KL(student || teacher) by default, or the forward KL, or GKD's generalized JSD with its beta
(Agarwal et al. 2024, "On-Policy Distillation of Language Models", arXiv:2306.13649), as TRL's
DistillationTrainer offers. The logits of both models are made chunk by chunk over the trained
positions (`align.ops.distill`), so no [tokens, vocab] tensor of the batch exists.

Each optimizer step is one round: its prompts are sampled once (train.batch_size x grad_accum x
processes completions, one per prompt), the loss is the sum of the token divergences over the
step divided by the step's completion tokens (as TRL's num_items_in_batch). The teacher runs
without gradient, in eval mode, on the same packed batch as the student; it must share the
student's tokenizer (checked when it loads, AlignError naming distill.teacher_model). Data: prompts
(`prompt` rows; the completions of `prompt_completion` rows are not used: the student writes its own).

Evaluation samples a completion per held-out prompt at the training settings (a fixed seed, so
evaluations compare) and reports, per completion token: eval/loss, the divergence the run
optimizes; eval/teacher_nll, the teacher's negative log-likelihood of the student's tokens (how
plausible the teacher finds them); eval/student_nll and eval/entropy (the student's own).
"""

from __future__ import annotations

import logging
import time
from typing import Literal

import torch
from pydantic import Field, model_validator
from torch import nn

from align.config import SamplingConfig, Section
from align.data.groups import packed_tokens, sequence_sums, sequence_tokens
from align.distributed import map_in_shares
from align.errors import AlignError
from align.losses.distill import check_divergence, distill_loss, distill_token_weights
from align.losses.policy_gradient import masked_mean
from align.models.head import check_logprobs_match_forward, logit_transform
from align.models.packed import decoder_hidden
from align.models import sharding, zero
from align.models.policy import Policy, TokenLogprobModel, causal_lm, unwrap
from align.ops.distill import DistillOutput, chunked_divergence
from align.rollout import Rollout
from align.trainers.base import register_trainer
from align.trainers.online import OnlineTrainer

log = logging.getLogger(__name__)


class DistillConfig(Section):
    teacher_model: str
    """The teacher: hub id, local directory or builtin:<name>, loaded with model's settings (dtype,
    attention, revision...) and no adapter, frozen. It must have the student's tokenizer."""
    sampling: SamplingConfig = Field(default_factory=SamplingConfig)
    """How the student samples its completions (sampling.temperature is also the loss's default)."""
    divergence: Literal["reverse_kl", "forward_kl", "generalized_jsd"] = "reverse_kl"
    """reverse_kl: KL(student || teacher) (on-policy distillation; TRL beta 1.0); forward_kl:
    KL(teacher || student) (TRL beta 0.0); generalized_jsd: GKD's JSD with `beta`."""
    beta: float = Field(0.5, gt=0.0, lt=1.0)
    """generalized_jsd only: the mixture m = (1 - beta) student + beta teacher, loss beta KL(teacher || m)
    + (1 - beta) KL(student || m) (TRL's DistillationConfig.beta; 0.5 is the symmetric JSD)."""
    temperature: float | None = Field(None, gt=0.0)
    """Both models' logits are divided by this in the divergence; default: sampling.temperature (1.0 when
    sampling is greedy), as TRL uses one temperature for sampling and loss."""

    @model_validator(mode="after")
    def _beta_is_for_the_jsd(self) -> "DistillConfig":
        # (a beta other than its default: a saved recipe, which holds every key, reads again)
        if self.beta != type(self).model_fields["beta"].default and self.divergence != "generalized_jsd":
            raise ValueError(f"beta applies to divergence: generalized_jsd only, and divergence is {self.divergence!r}"
                             " (TRL's beta 1.0 is divergence: reverse_kl, 0.0 is forward_kl); set "
                             "divergence: generalized_jsd or remove beta")
        return self


class DistillModel(TokenLogprobModel):
    """The student's trained module: a `TokenLogprobModel` whose forward, given the teacher's hidden
    states and lm-head, returns the chunked divergence instead (`align.ops.distill`), so that the
    whole loss runs inside the module accelerate prepares (DDP's backward hooks see it)."""

    def forward(self, input_ids: torch.Tensor, labels: torch.Tensor, position_ids: torch.Tensor | None = None,
                attention_mask: torch.Tensor | None = None, temperature: float = 1.0,
                label_positions: torch.Tensor | None = None, teacher_hidden: torch.Tensor | None = None,
                teacher_head: nn.Module | None = None, teacher_transform=None, distill_weights: torch.Tensor | None = None,
                beta: float = 1.0, cu_seq_lens: torch.Tensor | None = None, max_seq_len: int | None = None,
                **kwargs):
        """Without teacher_hidden: `TokenLogprobModel.forward`. With it ([B, T, H_t], the teacher's last
        hidden states on the same batch): the fields of `DistillOutput` as a tuple (total, then [B, T]
        divergence, entropy, student and teacher log-probs of the labels); distill_weights [B, T] are
        the tokens' weights in `total`; beta is TRL's (1 reverse KL, 0 forward KL, else the JSD's)."""
        if teacher_hidden is None:
            return super().forward(input_ids, labels, position_ids, attention_mask, temperature=temperature,
                                   label_positions=label_positions, cu_seq_lens=cu_seq_lens,
                                   max_seq_len=max_seq_len, **kwargs)
        lm = causal_lm(self.model)
        hidden = decoder_hidden(lm, input_ids, position_ids, attention_mask, cu_seq_lens, max_seq_len)
        out = chunked_divergence(hidden, lm.get_output_embeddings(), teacher_hidden, teacher_head, labels,
                                 distill_weights, beta=beta, temperature=temperature,
                                 transform=logit_transform(lm.config), teacher_transform=teacher_transform,
                                 positions=label_positions)
        return out.total, out.divergence, out.entropy, out.student_logps, out.teacher_logps


class TeacherModel(nn.Module):
    """The frozen teacher as one module whose forward returns its last hidden states [B, T, H_t]
    (its lm-head is applied in the student's loss, `DistillModel`). Being the teacher's root, under
    `train.fsdp_reference: sharded` its forward gathers the embedding, final norm and lm-head, and
    FSDP keeps a root's weights gathered after its forward until `reshard()`: the student's loss
    reads the whole lm-head then (not a DTensor shard)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor, position_ids: torch.Tensor | None = None,
                attention_mask: torch.Tensor | None = None, cu_seq_lens: torch.Tensor | None = None,
                max_seq_len: int | None = None, **_) -> torch.Tensor:
        return decoder_hidden(causal_lm(self.model), input_ids, position_ids, attention_mask, cu_seq_lens, max_seq_len)


class DistillPolicy(Policy):
    """A Policy whose reference model is the teacher (`Policy.from_config(reference_model=...)`),
    and whose trained module computes the distillation loss (`DistillModel`)."""

    reference_name = "teacher"

    def wrap(self, model: nn.Module) -> nn.Module:
        return DistillModel(model)

    def use_reference_model(self, model: nn.Module) -> None:
        """The teacher, frozen; its logits must be its own forward()'s (the probe every policy passes)."""
        check_logprobs_match_forward(causal_lm(model))
        self.probe_layouts(model)
        self._reference_module = TeacherModel(model).eval().requires_grad_(False)
        self.reference = "frozen_copy"

    @property
    def teacher(self) -> nn.Module:
        """The teacher's causal LM."""
        if self._reference_module is None:
            raise RuntimeError("this policy has no teacher")
        return causal_lm(unwrap(self._reference_module).model)

    def distill(self, batch: dict, token_weights: torch.Tensor | None, beta: float,
                temperature: float) -> DistillOutput:
        """The teacher's hidden states on `batch` (no gradient), then the student's forward with the
        chunked divergence (`DistillModel`). token_weights: [B, T] packed, each token's weight in
        `total` (the loss), or None (1 each). A sharded teacher's lm-head is whole while the student's
        loss reads it: under fsdp its root keeps what its forward gathered until resharded, under
        ZeRO-3 it is gathered for the student's forward."""
        root = self._reference_module
        root.eval()  # (a DeepSpeed engine's eval() returns None)
        if not self.reference_sharded:  # on the batch's device (under fsdp offload the student's weights are on the CPU)
            root.to(batch["input_ids"].device)
        try:
            with torch.no_grad():
                hidden = root(**batch)
            teacher = self.teacher
            head = teacher.get_output_embeddings()
            with zero.gathered_weights(head):
                outputs = self.module(**batch, teacher_hidden=hidden, teacher_head=head,
                                      teacher_transform=logit_transform(teacher.config), distill_weights=token_weights,
                                      beta=beta, temperature=temperature)
        finally:
            sharding.reshard_frozen(root)
        return DistillOutput(*outputs)


@register_trainer("distill", DistillConfig)
class DistillTrainer(OnlineTrainer):
    """On-policy distillation: one completion per prompt, sampled by the student; no reward functions."""

    @property
    def steps_per_round(self) -> int:
        return 1

    @property
    def temperature(self) -> float:
        """The loss's temperature: distill.temperature, else the sampling temperature (1 when greedy)."""
        return self.rl.temperature or self.rl.sampling.temperature or 1.0

    @property
    def logprob_temperature(self) -> float:
        return self.temperature

    @property
    def beta(self) -> float:
        """TRL's beta of the chosen divergence (1 reverse KL, 0 forward KL, else the JSD's)."""
        return check_divergence(self.rl.divergence, self.rl.beta)

    @classmethod
    def build_policy(cls, recipe) -> DistillPolicy:
        cfg = recipe.distill
        policy = DistillPolicy.from_config(recipe.model, recipe.adapter, reference_model=cfg.teacher_model,
                                           key="distill.teacher_model")
        student = causal_lm(policy.model).get_output_embeddings().weight.shape[0]
        teacher = policy.teacher.get_output_embeddings().weight.shape[0]
        if len(policy.tokenizer) > min(student, teacher):
            raise AlignError(f"distill.teacher_model: {cfg.teacher_model!r} has an output vocabulary of {teacher} "
                             f"tokens and the student {student}, but the tokenizer has {len(policy.tokenizer)}; "
                             "both models must score every token of the tokenizer")
        if student > teacher:
            raise AlignError(f"distill.teacher_model: the student's lm-head has {student} rows, more than the teacher's "
                             f"{teacher} ({cfg.teacher_model!r}): the student would sample ids the teacher cannot score "
                             "(padded rows); use a teacher whose lm-head has at least the student's rows")
        if student != teacher:
            log.info("student and teacher lm-heads have %d and %d rows (padded vocabularies): the divergence runs "
                     "over the student's %d", student, teacher, student)
        return policy

    # ---- experience -----------------------------------------------------------------------------
    def prepare_data(self) -> None:
        """The rollout engine (distillation has no reward functions to try)."""
        self.start_engine()

    def score(self, rows: list[dict], rollout: Rollout) -> torch.Tensor:
        """No reward functions: [N, 0]."""
        return torch.zeros(len(rollout.completion_ids), 0)

    def score_nothing(self) -> None:
        """No reward functions: nothing to run."""

    def make_experience(self, round_: int) -> dict:
        """Sample the round's completions (the student's); the teacher scores them in the loss."""
        rows = self.round_rows(round_)
        start = time.perf_counter()
        rollout, _ = self.sample_and_score(rows, round_)
        groups = self.build_groups(rows, rollout)
        return {"round": round_, "groups": groups,
                "metrics": self.rollout_metrics(rollout, time.perf_counter() - start)}

    def build_groups(self, rows: list[dict], rollout: Rollout, scores: torch.Tensor | None = None) -> list[dict]:
        return [{"prompt_ids": row["prompt_ids"], "completions": [completion], "trained": [True]}
                for row, completion in zip(rows, rollout.completion_ids)]

    # ---- loss -----------------------------------------------------------------------------------
    def count_items(self, batch: dict) -> float:
        """The completion tokens: the loss is the mean token divergence over the step's."""
        return float(batch["mask"].sum())

    def compute_loss(self, batch: dict) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """sum of the token divergences / the step's tokens (`distill_loss`); its gradient made in the
        chunked forward with the same token weights (`distill_token_weights`)."""
        mask, num_items, sequence_ids = batch["mask"], batch["num_items"], batch["sequence_ids"]
        weights = packed_tokens(distill_token_weights(mask, num_items), sequence_ids)
        out = self.policy.distill(batch, weights, self.beta, self.temperature)
        per_sequence = lambda packed: sequence_tokens(packed, sequence_ids, *mask.shape)
        loss = distill_loss(per_sequence(out.divergence), mask, num_items)
        loss = loss.detach() + (out.total - out.total.detach())
        metrics = {"entropy": masked_mean(per_sequence(out.entropy), mask).detach(),
                   "teacher_nll": -masked_mean(per_sequence(out.teacher_logps), mask).detach()}
        return loss, metrics

    # ---- evaluation -----------------------------------------------------------------------------
    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        """One completion per eval prompt sampled at the training settings with a fixed seed (the
        seed depends on the chunk only, so every evaluation draws alike), scored by the teacher:
        per completion token, eval/loss (the divergence), eval/teacher_nll, eval/student_nll,
        eval/entropy; and eval/completions/mean_length. The first greedy completions go to
        OUTPUT_DIR/samples.jsonl."""

        def measured(indices) -> list[list[float]]:  # per prompt: [divergence, entropy, student nll, teacher nll, tokens]
            rows = [self.eval_data[i] for i in indices]
            params = self.sampling_params(seed=self.cfg.seed * 1_000_003 + 999_999_937 + int(indices[0]))
            rollout = self.engine.generate([r["prompt_ids"] for r in rows], params, 1)
            batch = self._to_device(self.collate(self.build_groups(rows, rollout)))
            with self.autocast():
                out = self.policy.distill(batch, None, self.beta, self.temperature)
            sums = [sequence_sums(v.double(), batch["sequence_ids"], len(rows))
                    for v in (out.divergence, out.entropy, -out.student_logps, -out.teacher_logps)]
            sums = torch.stack(sums, 1).cpu().tolist()
            return [s + [float(len(c))] for s, c in zip(sums, rollout.completion_ids)]

        self.sync_sampler()
        with self.policy.eval_mode():
            results = map_in_shares(range(len(self.eval_data)), self.cfg.eval_batch_size or self.cfg.batch_size,
                                    measured, even=self.lockstep)  # fsdp, ZeRO-3: each forward is a collective
        totals = torch.tensor(results, dtype=torch.float64).sum(0).tolist()
        tokens = max(totals[4], 1.0)
        self.show_samples(self.greedy_samples())
        return {"eval/loss": totals[0] / tokens, "eval/entropy": totals[1] / tokens,
                "eval/student_nll": totals[2] / tokens, "eval/teacher_nll": totals[3] / tokens,
                "eval/completions/mean_length": totals[4] / len(results)}
