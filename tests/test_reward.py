import pytest
import torch

from align.models.reward import load_reward_model
from align.toy import preference_rows
from align.trainers import RewardTrainer

pytestmark = pytest.mark.usefixtures("arith_builtin")  # builtin:tiny-llama-arith, trained once


@pytest.fixture
def rm_recipe(make_recipe):
    def make(**sections):
        base = dict(algorithm="reward", rows=preference_rows(64, seed=21), eval_rows=preference_rows(40, seed=22),
                    train={"max_steps": 12, "batch_size": 16, "lr": 1e-3})
        for key, value in sections.items():
            base[key] = {**base.get(key, {}), **value} if isinstance(value, dict) else value
        return make_recipe(**base)
    return make


@pytest.mark.parametrize("adapter", ["none", "lora", "qlora"])
def test_reward_model_separates_held_out_pairs_and_loads_as_a_scorer(rm_recipe, tmp_path, adapter):
    lr = 1e-3 if adapter == "none" else 5e-3
    trainer = RewardTrainer.from_recipe(rm_recipe(adapter={"kind": adapter, "r": 8, "dropout": 0.0},
                                                  train={"lr": lr}, reward={"center_coef": 0.01}))
    before = trainer.evaluate()
    trainer.fit()
    after = trainer.evaluate()
    assert after["eval/accuracy"] >= 0.95 and after["eval/loss"] < before["eval/loss"], (before, after)

    scorer = load_reward_model(str(tmp_path / "run"))
    pairs = preference_rows(40, seed=22)
    chosen = scorer([p["prompt"] for p in pairs], [p["chosen"] for p in pairs])
    rejected = scorer([p["prompt"] for p in pairs], [p["rejected"] for p in pairs])
    assert len(chosen) == 40 and all(isinstance(x, float) for x in chosen)
    assert sum(c > r for c, r in zip(chosen, rejected)) / 40 >= 0.95
    # the reloaded scorer gives the trained model's own scores (4-bit: re-quantized merge, so looser)
    batch = trainer.collate([trainer.eval_data[i] for i in range(4)])
    with torch.no_grad(), trainer.policy.eval_mode():
        own = trainer.policy.scores(batch)[0::2]
    torch.testing.assert_close(torch.tensor(chosen[:4]), own, atol=1e-4 if adapter != "qlora" else 0.2, rtol=0.05)


def test_margin_column_enters_the_loss(rm_recipe):
    rows = preference_rows(8, seed=1)
    trainer = RewardTrainer.from_recipe(rm_recipe(rows=rows))
    plain = trainer.compute_loss({**trainer.collate([trainer.train_data[i] for i in range(8)]), "num_items": 8})[0]
    with_margin = [dict(r, margin=2.0) for r in rows]
    trainer2 = RewardTrainer.from_recipe(rm_recipe(rows=with_margin))
    shifted = trainer2.compute_loss({**trainer2.collate([trainer2.train_data[i] for i in range(8)]), "num_items": 8})[0]
    assert shifted.item() > plain.item() + 0.1


def test_scorer_scores_a_truncated_completion_as_sampled_without_an_eos():
    """A completion that hit max_new_tokens is scored on its sampled ids, with no EOS appended; one
    whose sampled ids end in EOS is scored as before (re-tokenized, EOS appended)."""
    from align.config import AdapterConfig, ModelConfig
    from align.models.reward import RewardModel, RewardScorer

    torch.manual_seed(0)
    model = RewardModel.from_config(ModelConfig(name_or_path="builtin:tiny-llama-arith", dtype="float32"),
                                    AdapterConfig())
    scorer, tokenizer = RewardScorer(model), model.tokenizer
    prompts = ["Question: What is 4 + 18?\nAnswer:"] * 2
    texts = [" 4 + 18 = 22. The answer is 22.", " 4 + 18 = 22. The"]
    ids = [tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]
    finished = [ids[0] + [tokenizer.eos_token_id], ids[1] + [tokenizer.eos_token_id]]
    as_text = scorer(prompts, texts)  # no ids: each text is a whole answer
    assert scorer(prompts, texts, completion_ids=finished) == as_text
    truncated = scorer(prompts, texts, completion_ids=ids)
    assert all(abs(a - b) > 1e-4 for a, b in zip(truncated, as_text))
    prompt_ids = tokenizer(prompts[0])["input_ids"]
    with torch.no_grad():
        by_hand = [model.scores({"input_ids": torch.tensor([prompt_ids + c]), "last_index": torch.tensor([-1]),
                                 "position_ids": torch.arange(len(prompt_ids + c))[None]}).item() for c in ids]
    assert truncated == pytest.approx(by_hand, abs=1e-5)


def test_scorer_takes_a_completion_ending_in_the_policy_s_end_of_turn_id_as_finished():
    """The policy's completions end at any EOS id of its generation config (an instruct model's end of
    turn); `match_policy` hands the scorer those ids, so such a completion is scored as a finished
    answer (re-tokenized, EOS appended), not on its ids as an unfinished one."""
    from align.config import AdapterConfig, ModelConfig
    from align.models.reward import RewardModel, RewardScorer

    torch.manual_seed(0)
    model = RewardModel.from_config(ModelConfig(name_or_path="builtin:tiny-llama-arith", dtype="float32"),
                                    AdapterConfig())
    scorer, tokenizer = RewardScorer(model), model.tokenizer
    prompts, texts = ["Question: What is 4 + 18?\nAnswer:"], [" 4 + 18 = 22. The answer is 22."]
    end_of_turn = tokenizer.convert_tokens_to_ids("<|pad|>")
    sampled = [tokenizer(texts[0], add_special_tokens=False)["input_ids"] + [end_of_turn]]
    as_text = scorer(prompts, texts)
    assert abs(scorer(prompts, texts, completion_ids=sampled)[0] - as_text[0]) > 1e-4  # unfinished: as sampled
    scorer.match_policy(tokenizer, [tokenizer.eos_token_id, end_of_turn], "rm")
    assert scorer(prompts, texts, completion_ids=sampled) == as_text


@pytest.mark.parametrize("shared_prompt", [True, False])
def test_scores_are_read_where_the_models_own_forward_reads_them_when_pad_is_eos(make_recipe, tmp_path,
                                                                                 shared_prompt):
    """transformers' sequence-classification forward reads a score at the last token that is not the
    pad token; with pad = EOS (tokenizers without a pad token, Llama 3's) that is the token before the
    EOS a completion ends with. (Align read it at the EOS: a reward model it trained scored otherwise
    under transformers or TRL, and one trained there got other rewards in Align.)"""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer, LlamaConfig

    from align.models.reward import RewardScorer
    from align.models.tiny import resolve

    path = tmp_path / "pad-is-eos"
    tokenizer = AutoTokenizer.from_pretrained(resolve("builtin:tiny-llama"))
    tokenizer.pad_token = tokenizer.eos_token
    tokenizer.save_pretrained(path)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, num_labels=1,
                         pad_token_id=tokenizer.eos_token_id, eos_token_id=tokenizer.eos_token_id)
    torch.manual_seed(0)
    AutoModelForSequenceClassification.from_config(config).save_pretrained(path)
    trainer = RewardTrainer.from_recipe(make_recipe(algorithm="reward", rows=preference_rows(4, seed=3),
                                                    model={"name_or_path": str(path)},
                                                    reward={"shared_prompt": shared_prompt}))
    examples = [trainer.train_data[i] for i in range(4)]
    plain = AutoModelForSequenceClassification.from_pretrained(path).eval()
    with torch.no_grad(), trainer.policy.eval_mode():
        ours = trainer.policy.scores(trainer.collate(examples))
        own = [plain(input_ids=torch.tensor([e["prompt_ids"] + e[side]])).logits[0, 0]
               for e in examples for side in ("chosen_ids", "rejected_ids")]
    assert examples[0]["chosen_ids"][-1] == tokenizer.eos_token_id  # the case: a completion ends in the pad id
    torch.testing.assert_close(ours, torch.stack(own), atol=1e-5, rtol=0)
    scorer = RewardScorer(trainer.policy)
    prompts, completions = ["Question: What is 2 + 2?\nAnswer:"] * 2, [" 4", ""]
    with torch.no_grad():
        want = [plain(input_ids=torch.tensor([sum(scorer.input_ids(p, c, None, 0), [])])).logits[0, 0].item()
                for p, c in zip(prompts, completions)]
    assert scorer(prompts, completions) == pytest.approx(want, abs=1e-5)
