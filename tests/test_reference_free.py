"""SimPO and ORPO (`dpo.loss_type: simpo | orpo`): closed forms, parity with TRL 1.16's CPO (simpo)
and ORPO trainers, and DPO training with no reference model on the toy preference task."""

import decimal
import json
import math
import types

import pytest
import torch
import torch.nn.functional as F

from align.losses.preference import PairLogps, preference_loss
from align.losses.reference_free import log_odds, odds_ratio_term, orpo, simpo
from align.registry import PREFERENCE_LOSSES
from align.toy import preference_rows
from align.trainers import DPOTrainer

pytestmark = pytest.mark.filterwarnings("ignore:You are importing from 'trl.experimental'")


def pairs_of(chosen, rejected, chosen_tokens, rejected_tokens, dtype=torch.float64, grad=False) -> PairLogps:
    c, r = (torch.tensor(v, dtype=dtype, requires_grad=grad) for v in (chosen, rejected))
    return PairLogps(c, r, torch.tensor(chosen_tokens), torch.tensor(rejected_tokens))


def softplus(x: float) -> float:  # -logsigmoid(-x)
    return math.log1p(math.exp(x))


def test_registered_reference_free():
    for name in ("simpo", "orpo"):
        assert PREFERENCE_LOSSES.get(name).needs_reference is False


# --- closed forms --------------------------------------------------------------------------------

@pytest.mark.parametrize("eps", [0.0, 0.2])
def test_simpo_closed_form(eps):
    # averages: chosen -2/4 = -0.5, rejected -3/2 = -1.5; beta 2, gamma 0.5 -> z = 2 * 1 - 0.5 = 1.5
    pairs = pairs_of([-2.0, -6.0], [-3.0, -1.0], [4, 3], [2, 1], grad=True)
    losses, chosen, rejected = simpo(pairs, beta=2.0, label_smoothing=eps, gamma=0.5)
    z = [1.5, 2.0 * (-2.0 + 1.0) - 0.5]
    expected = [(1 - eps) * softplus(-v) + eps * softplus(v) for v in z]
    torch.testing.assert_close(losses, torch.tensor(expected, dtype=torch.float64))
    torch.testing.assert_close(chosen, torch.tensor([-1.0, -4.0], dtype=torch.float64))
    torch.testing.assert_close(rejected, torch.tensor([-3.0, -2.0], dtype=torch.float64))
    assert not chosen.requires_grad
    losses[0].backward()  # d loss / d z = -(1 - eps) sigmoid(-z) + eps sigmoid(z); dz/d chosen_sum = beta / 4
    dz = -(1 - eps) / (1 + math.exp(1.5)) + eps / (1 + math.exp(-1.5))
    assert pairs.chosen.grad[0].item() == pytest.approx(dz * 2.0 / 4)
    assert pairs.rejected.grad[0].item() == pytest.approx(-dz * 2.0 / 2)


def test_simpo_margin_gamma_shifts_the_loss():
    pairs = pairs_of([-1.0], [-1.0], [1], [1])  # equal averages: z = -gamma
    assert simpo(pairs, beta=1.0, gamma=0.0)[0].item() == pytest.approx(math.log(2))
    assert simpo(pairs, beta=1.0, gamma=1.0)[0].item() == pytest.approx(softplus(1.0))


def test_orpo_closed_form_and_gradient():
    # chosen: avg log p = log 0.5 over 3 tokens (odds 1); rejected: avg log p = log 0.2 over 2 tokens (odds 1/4)
    beta = 0.25
    pairs = pairs_of([3 * math.log(0.5)], [2 * math.log(0.2)], [3], [2], grad=True)
    losses, chosen, rejected = orpo(pairs, beta)
    # L_SFT = -log 0.5; L_OR = -logsigmoid(log 1 - log 1/4) = log(1 + 1/4)
    assert losses.item() == pytest.approx(math.log(2) + beta * math.log(1.25))
    assert chosen.item() == pytest.approx(beta * math.log(0.5))
    assert rejected.item() == pytest.approx(beta * math.log(0.2))
    losses.sum().backward()
    # d/dx log odds(x) = 1 / (1 - p); d L_OR / d (log odds diff) = -sigmoid(-log 4) = -1/5
    d_chosen_avg = -1.0 + beta * (-0.2) * (1 / (1 - 0.5))
    d_rejected_avg = beta * 0.2 * (1 / (1 - 0.2))
    assert pairs.chosen.grad.item() == pytest.approx(d_chosen_avg / 3)
    assert pairs.rejected.grad.item() == pytest.approx(d_rejected_avg / 2)


def test_log_odds_is_stable_at_both_ends():
    x = torch.tensor([-1e-9, -1e-4, -0.6931, -0.6932, -5.0, -60.0], dtype=torch.float64)
    with decimal.localcontext() as context:  # log(p / (1 - p)) to 60 digits
        context.prec = 60
        exact = [float((d.exp() / (1 - d.exp())).ln()) for d in map(decimal.Decimal, x.tolist())]
    torch.testing.assert_close(log_odds(x), torch.tensor(exact, dtype=torch.float64), rtol=1e-12, atol=0)
    # a completion the policy is certain of (float32 average log-prob exactly 0): finite loss, finite gradient
    pairs = pairs_of([0.0, -3.0], [-2.0, 0.0], [2, 3], [1, 1], dtype=torch.float32, grad=True)
    losses, _, _ = orpo(pairs, 0.5)
    losses.sum().backward()
    assert torch.isfinite(losses).all() and torch.isfinite(pairs.chosen.grad).all()
    assert torch.isfinite(pairs.rejected.grad).all()


def test_orpo_rejects_label_smoothing_and_kwargs_reach_simpo():
    pairs = pairs_of([-2.0], [-3.0], [2], [3])
    with pytest.raises(ValueError, match="orpo has no label smoothing"):
        preference_loss(pairs, "orpo", 0.1, label_smoothing=0.1)
    loss, metrics = preference_loss(pairs, "simpo", 2.0, gamma=1.0)
    assert loss.item() == pytest.approx(softplus(-(2.0 * (-1.0 + 1.0) - 1.0)))
    assert metrics["rewards/margin"].item() == pytest.approx(0.0)


# --- parity with TRL 1.16 ------------------------------------------------------------------------

ACC = types.SimpleNamespace(device="cpu", gather_for_metrics=lambda x: x, gather=lambda x: x)
LENGTHS_C, LENGTHS_R = torch.tensor([6, 3, 5, 1]), torch.tensor([2, 6, 4, 4])


def random_sums(seed: int):
    """[B] summed completion log-probs (float32, with gradient) whose averages span (-3, 0),
    some close to 0 and to -log 2 where log1mexp switches branch."""
    g = torch.Generator().manual_seed(seed)
    avg_c = torch.tensor([-0.01, -0.69, -1.3, -2.9]) * (1 + 0.01 * torch.rand(4, generator=g))
    avg_r = -3 * torch.rand(4, generator=g)
    return (avg_c * LENGTHS_C).requires_grad_(), (avg_r * LENGTHS_R).requires_grad_()


@pytest.mark.parametrize("beta,gamma,eps", [(0.1, 0.5, 0.0), (2.5, 1.4, 0.0), (2.0, 0.5, 0.2)])
def test_simpo_matches_trl_cpo_simpo(beta, gamma, eps):
    pytest.importorskip("trl")
    from trl.experimental.cpo import CPOTrainer

    sum_c, sum_r = random_sums(0)
    fake = types.SimpleNamespace(alpha=0.0, loss_type="simpo", simpo_gamma=gamma, beta=beta, label_smoothing=eps,
                                 accelerator=ACC)
    # TRL's CPO with loss_type="simpo" scores each completion by its per-token average log-prob
    trl = CPOTrainer.cpo_loss(fake, sum_c / LENGTHS_C, sum_r / LENGTHS_R)
    ours = simpo(PairLogps(sum_c, sum_r, LENGTHS_C, LENGTHS_R), beta, eps, gamma=gamma)
    for a, b in zip(ours, trl):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-6)
    grads = [torch.autograd.grad(loss.mean(), (sum_c, sum_r)) for loss in (ours[0], trl[0])]
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("beta", [0.1, 0.25, 1.0])
def test_orpo_odds_ratio_term_matches_trl_on_any_lengths(beta):
    pytest.importorskip("trl")
    from trl.experimental.orpo import ORPOTrainer

    sum_c, sum_r = random_sums(1)
    avg_c, avg_r = sum_c / LENGTHS_C, sum_r / LENGTHS_R
    trl_losses, trl_chosen, trl_rejected, trl_ratio, trl_log_odds = ORPOTrainer.odds_ratio_loss(
        types.SimpleNamespace(beta=beta, accelerator=ACC), avg_c, avg_r)
    losses, chosen, rejected = orpo(PairLogps(sum_c, sum_r, LENGTHS_C, LENGTHS_R), beta)
    term = losses + avg_c  # our loss less its NLL term: beta * L_OR
    torch.testing.assert_close(term, -trl_losses, atol=1e-6, rtol=1e-6)  # TRL's losses are beta * logsigmoid(.)
    torch.testing.assert_close(odds_ratio_term(avg_c, avg_r).mean(), -trl_ratio, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close((log_odds(avg_c) - log_odds(avg_r)).mean(), trl_log_odds, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(chosen, trl_chosen)
    torch.testing.assert_close(rejected, trl_rejected)
    grads = [torch.autograd.grad(t.mean(), (sum_c, sum_r), retain_graph=True) for t in (term, -trl_losses)]
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-6)


def test_orpo_full_loss_matches_trl_on_equal_chosen_lengths():
    """TRL's ORPOTrainer.get_batch_loss_metrics (its NLL over all chosen tokens, plus the odds-ratio
    term) against ours, from the same logits: one prompt token (which TRL's shifted NLL skips),
    chosen completions of 4 tokens each, rejected ones of different lengths."""
    pytest.importorskip("trl")
    from trl.experimental.orpo import ORPOTrainer

    B, V, beta = 3, 11, 0.2
    g = torch.Generator().manual_seed(2)
    chosen_len, rejected_len = [4, 4, 4], [2, 5, 3]
    T = 1 + max(chosen_len + rejected_len)

    def side(lengths):
        ids = torch.zeros(B, 1 + max(lengths), dtype=torch.long)
        mask = torch.zeros_like(ids)
        for row, n in enumerate(lengths):
            ids[row, :1 + n] = torch.randint(1, V, (1 + n,), generator=g)
            mask[row, :1 + n] = 1
        labels = torch.where(mask.bool(), ids, -100)
        labels[:, 0] = -100  # the prompt
        return ids, mask, labels

    batch = {}
    for name, lengths in (("chosen", chosen_len), ("rejected", rejected_len)):
        batch[f"{name}_input_ids"], batch[f"{name}_attention_mask"], batch[f"{name}_labels"] = side(lengths)
    logits = (3 * torch.randn(2 * B, T, V, generator=g)).requires_grad_()

    fake = types.SimpleNamespace(beta=beta, accelerator=ACC, is_encoder_decoder=False, padding_value=0,
                                 aux_loss_enabled=False, concatenated_inputs=ORPOTrainer.concatenated_inputs,
                                 get_batch_logps=ORPOTrainer.get_batch_logps)
    fake.concatenated_forward = types.MethodType(ORPOTrainer.concatenated_forward, fake)
    fake.odds_ratio_loss = types.MethodType(ORPOTrainer.odds_ratio_loss, fake)
    model = lambda input_ids, **kw: types.SimpleNamespace(logits=logits)  # noqa: E731
    trl_loss, trl_metrics = ORPOTrainer.get_batch_loss_metrics(fake, model, batch)

    # ours: summed completion log-probs of the same logits (TRL pads both sides to T)
    labels = torch.cat([F.pad(batch[f"{n}_labels"], (0, T - batch[f"{n}_labels"].shape[1]), value=-100)
                        for n in ("chosen", "rejected")])[:, 1:]
    mask = labels != -100
    token = torch.log_softmax(logits[:, :-1], -1).gather(-1, labels.clamp(min=0)[..., None])[..., 0] * mask
    sums, counts = token.sum(-1), mask.sum(-1)
    pairs = PairLogps(sums[:B], sums[B:], counts[:B], counts[B:])
    loss, metrics = preference_loss(pairs, "orpo", beta)
    torch.testing.assert_close(loss, trl_loss, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(torch.autograd.grad(loss, logits)[0], torch.autograd.grad(trl_loss, logits)[0],
                               atol=1e-6, rtol=1e-6)
    for ours, theirs in (("rewards/chosen", "rewards/chosen"), ("rewards/rejected", "rewards/rejected"),
                         ("rewards/accuracy", "rewards/accuracies"), ("rewards/margin", "rewards/margins")):
        assert metrics[ours].item() == pytest.approx(trl_metrics[theirs], abs=1e-6)
    nll = -(sums[:B] / counts[:B]).mean()
    assert nll.item() == pytest.approx(trl_metrics["nll_loss"], abs=1e-6)


# --- training without a reference ----------------------------------------------------------------

@pytest.mark.parametrize("loss_type,dpo", [("simpo", {"beta": 2.0, "loss_kwargs": {"gamma": 0.5}}),
                                           ("orpo", {"beta": 0.1})])
def test_dpo_trainer_learns_without_reference(make_recipe, tmp_path, loss_type, dpo):
    recipe = make_recipe(algorithm="dpo", rows=preference_rows(64, seed=11), eval_rows=preference_rows(32, seed=12),
                         adapter={"kind": "lora", "r": 8, "alpha": 16, "dropout": 0.0},
                         dpo={"loss_type": loss_type, **dpo},
                         train={"max_steps": 8, "batch_size": 16, "lr": 5e-3, "eval_at_start": True, "eval_every": 4,
                                "eval_batch_size": 32})
    trainer = DPOTrainer.from_recipe(recipe)
    assert trainer.policy.reference == "none" and trainer.policy._reference_module is None
    assert "ref_logps" not in trainer.train_data.column_names + trainer.eval_data.column_names
    assert "ref_logps" not in trainer.collate([trainer.train_data[0]])
    trainer.fit()
    evals = [r for r in map(json.loads, open(tmp_path / "run" / "metrics.jsonl")) if "eval/loss" in r]
    assert [r["step"] for r in evals] == [0, 4, 8]
    first, last = evals[0], evals[-1]
    beta = dpo["beta"]
    # held-out pairs: the chosen answers' per-token log-prob overtakes the hedge's on every pair
    assert first["eval/rewards/accuracy"] < 0.8 and last["eval/rewards/accuracy"] == 1.0
    assert last["eval/rewards/margin"] / beta > first["eval/rewards/margin"] / beta + 0.2  # in nats per token
    assert last["eval/loss"] < first["eval/loss"] - 0.3
