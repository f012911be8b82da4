"""AI feedback (align.feedback, rewards/judge.py): constitutions, the judge's label probabilities,
both orders and ties, the cached constitution prefix, the data written for the trainers, the judge
reward, the label/revise commands, and one toy loop (judge -> label -> DPO -> accuracy)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from align.cli import main
from align.config import DataSource
from align.errors import AlignError
from align.feedback import judge as judge_module
from align.feedback.config import JudgeConfig, load_task
from align.feedback.constitution import load_constitution
from align.feedback.judge import Judge, compare_query, label_token_ids, load_judge, score_query
from align.feedback.label import candidate_pairs, decide, label_pairs
from align.feedback.revise import critique_prompt, revise, revision_prompt
from align.models import tiny

ROOT = Path(__file__).resolve().parents[1]
CONSTITUTION = ROOT / "recipes" / "constitutions" / "helpful_honest.md"
PROMPT = "Question: What is 7 + 5?\nAnswer:"


@pytest.fixture(scope="module")
def tiny_parts():
    path = tiny.resolve("builtin:tiny-llama")
    return AutoModelForCausalLM.from_pretrained(path).eval(), AutoTokenizer.from_pretrained(path)


def make_judge(tiny_parts, **kwargs) -> Judge:
    model, tokenizer = tiny_parts
    kwargs = {"compare_labels": ["A", "B"], **kwargs}
    return Judge(model, tokenizer, load_constitution(CONSTITUTION), **kwargs)


# ---- constitutions --------------------------------------------------------------------------------

def test_markdown_constitution_names_weights_and_continuations(tmp_path):
    path = tmp_path / "c.md"
    path.write_text("# Title\nA note, not a principle.\n\n- **safe** (weight 3): Prefer the safe answer,\n"
                    "  even when it is longer.\n* Prefer short answers.\n1. **kind**: Be kind.\n")
    c = load_constitution(path)
    assert [(p.name, p.text, p.weight) for p in c.principles] == [
        ("safe", "Prefer the safe answer, even when it is longer.", 3.0),
        ("principle_2", "Prefer short answers.", 1.0), ("kind", "Be kind.", 1.0)]
    assert c.weights == [0.6, 0.2, 0.2]
    assert c.render().splitlines()[1] == "2. principle_2: Prefer short answers."


def test_yaml_constitution(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("principles:\n  - Be brief.\n  - {name: right, text: Be right., weight: 2}\n")
    c = load_constitution(path)
    assert c.names == ["principle_1", "right"] and c.weights == pytest.approx([1 / 3, 2 / 3])


def test_shipped_toy_constitution_matches_the_toy_judge(tmp_path):
    from align.feedback.toy_judge import CONSTITUTION

    (tmp_path / "toy.md").write_text(CONSTITUTION)
    shipped = load_constitution(ROOT / "recipes" / "constitutions" / "arith_correct.yaml")
    assert shipped.principles == load_constitution(tmp_path / "toy.md").principles


@pytest.mark.parametrize("name,text,message", [
    ("c.md", "Just notes, no list.\n", "holds no principles"),
    ("c.md", "- **a** (weight -1): x\n", "must be a finite number above 0"),
    ("c.md", "- **a** (weight two): x\n", "is not a number"),
    ("c.md", "- **a**: x\n- **a**: y\n", "names principle 'a' twice"),
    ("c.yaml", "principles: [{name: a, txt: x}]\n", "a principle is a string or a mapping"),
    ("c.json", "[]", r"use markdown \(\.md\) or YAML"),
])
def test_bad_constitutions_are_refused(tmp_path, name, text, message):
    path = tmp_path / name
    path.write_text(text)
    with pytest.raises(AlignError, match=message):
        load_constitution(path)


# ---- which tokens are scored ----------------------------------------------------------------------

def test_labels_must_be_single_tokens_where_they_are_fed(tiny_parts):
    _, tokenizer = tiny_parts
    query = compare_query(load_constitution(CONSTITUTION), 0, PROMPT, "a", "b")
    assert label_token_ids(tokenizer, ["A", "B"], query, "judge.labels") == \
        tokenizer.convert_tokens_to_ids(["A", "B"])
    with pytest.raises(AlignError, match=r"label ' A' is not one token .*2 token\(s\): \['Ġ', 'A'\].*'A' instead"):
        label_token_ids(tokenizer, [" A", " B"], query, "judge.labels")
    with pytest.raises(AlignError, match="map to the same token"):
        label_token_ids(tokenizer, ["A", "A"], query, "judge.labels")
    score = score_query(load_constitution(CONSTITUTION), 0, PROMPT, "a", [" 1", " 100"])
    with pytest.raises(AlignError, match="label ' 100' is not one token"):
        label_token_ids(tokenizer, [" 1", " 100"], score, "judge.score_labels")


def test_label_probabilities_are_the_next_token_logits_after_the_full_text(tiny_parts):
    """The judge's probabilities equal a softmax, over the label ids only, of the logits at the last
    position of prefix + query run through the model by hand, for every query and principle."""
    model, tokenizer = tiny_parts
    judge = make_judge(tiny_parts, batch_size=3)
    prompts, first, second = [PROMPT, "Question: What is 3 - 9?\nAnswer:"], [" 12", " Hmm."], [" 13", " -6 long"]
    got = judge.compare(prompts, first, second)  # [2, K]
    ids = tokenizer.convert_tokens_to_ids(["A", "B"])
    for i in range(2):
        for k in range(3):
            text = judge.text(compare_query(judge.constitution, k, prompts[i], first[i], second[i]))
            assert text.endswith("Better response:")
            full = tokenizer(text, return_tensors="pt")["input_ids"]
            with torch.no_grad():
                logits = model(input_ids=full).logits[0, -1]
            assert got[i, k].item() == pytest.approx(torch.softmax(logits[ids], -1)[0].item(), abs=1e-5)


def test_score_is_the_expected_label_value(tiny_parts):
    model, tokenizer = tiny_parts
    judge = make_judge(tiny_parts, score_labels=[" 1", " 2", " 3"], score_values=[0.0, 5.0, 10.0])
    got = judge.score([PROMPT], [" 7 + 5 = 12. The answer is 12."])  # [1, K]
    ids = tokenizer.convert_tokens_to_ids(["Ġ1", "Ġ2", "Ġ3"])
    text = judge.text(score_query(judge.constitution, 1, PROMPT, " 7 + 5 = 12. The answer is 12.", [" 1", " 2", " 3"]))
    with torch.no_grad():
        logits = model(input_ids=tokenizer(text, return_tensors="pt")["input_ids"]).logits[0, -1]
    expected = torch.softmax(logits[ids], -1) @ torch.tensor([0.0, 5.0, 10.0])
    assert got[0, 1].item() == pytest.approx(expected.item(), abs=1e-4)
    assert judge.combine(got).item() == pytest.approx((got[0] @ torch.tensor([0.5, 0.25, 0.25])).item(), abs=1e-6)


def test_cached_prefix_equals_uncached(tiny_parts):
    """Queries of different lengths in several batches after the prefix's cached keys/values give the
    probabilities of prefix + query run whole, and the cached prefix is computed once, unchanged."""
    cached, uncached = make_judge(tiny_parts, batch_size=4), make_judge(tiny_parts, batch_size=4, cache_prefix=False)
    prompts = [f"Question: What is {a} + {b}?\nAnswer:" for a, b in [(1, 2), (13, 7), (20, 19), (0, 0), (5, 11)]]
    first = [" 3", " 13 + 7 = 20. The answer is 20.", " Hmm, I am not sure.", " 0", " The answer is 16 or 17."]
    second = [" 4", " 19", " 20 + 19 = 39. The answer is 39.", " 1 and some more words here", " 16"]
    a = cached.compare(prompts, first, second)
    cache = cached.prefix_cache()
    b = uncached.compare(prompts, first, second)
    assert uncached._prefix_cache is None  # the uncached judge never built one
    assert torch.allclose(a, b, atol=1e-5, rtol=0) and a.shape == (5, 3)
    assert torch.allclose(cached.score(prompts, first), uncached.score(prompts, first), atol=1e-5, rtol=0)
    assert cached.prefix_cache() is cache and cache.get_seq_length() == len(cached.prefix_ids)
    assert cached.prefix_ids == cached.tokenizer(cached.prefix_text)["input_ids"][:len(cached.prefix_ids)]


def test_custom_templates_share_a_stable_prefix(tiny_parts):
    """A prefix ending in whitespace that the tokenizer would merge with the question: only the tokens
    that stay the same are cached, and cached still equals uncached."""
    from align.feedback.judge import Templates

    templates = Templates(prefix="Rules: {principles}\n\n", compare="{prompt}\nA:{first}\nB:{second}\nBetter:",
                          score="{prompt}\nR:{response}\nScore ({text}):")
    cached = make_judge(tiny_parts, templates=templates)
    uncached = make_judge(tiny_parts, templates=templates, cache_prefix=False)
    tokenizer = cached.tokenizer
    query = cached.compare_query(0, PROMPT, " 12", " 13")
    assert cached.prefix_ids + cached.encode(query) == tokenizer(cached.text(query))["input_ids"]
    assert torch.allclose(cached.compare([PROMPT] * 2, [" 12", " 1"], [" 13", " 2 3"]),
                          uncached.compare([PROMPT] * 2, [" 12", " 1"], [" 13", " 2 3"]), atol=1e-5, rtol=0)
    assert "Prefer the answer whose final result is right." in cached.score_query(0, PROMPT, " 12")


@pytest.mark.parametrize("templates,message", [
    ({"compare": "{prompt} {first} Better:"}, "compare: needs {second}"),
    ({"score": "{prompt} {response} {answer}"}, "score: unknown placeholder {answer}"),
    ({"prefix": "Rules {principles"}, "prefix: .*literal brace"),
])
def test_bad_templates_are_refused(templates, message):
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match=message):
        JudgeConfig(model="builtin:tiny-llama", constitution=str(CONSTITUTION), templates=templates)


# ---- both orders, ties, principles ----------------------------------------------------------------

def test_compare_both_asks_in_both_orders(tiny_parts):
    judge = make_judge(tiny_parts)
    first, second = judge.compare_both([PROMPT, PROMPT], [" 12", " x"], [" 13", " y"])
    assert torch.allclose(first, judge.compare([PROMPT, PROMPT], [" 12", " x"], [" 13", " y"]), atol=1e-6)
    assert torch.allclose(second, 1 - judge.compare([PROMPT, PROMPT], [" 13", " y"], [" 12", " x"]), atol=1e-6)


def test_decide_winner_ties_and_the_deciding_principle():
    weights = [0.5, 0.25, 0.25]
    first = torch.tensor([[0.9, 0.6, 0.5],    # a better in both orders; principle 0 pulls hardest
                          [0.9, 0.9, 0.9],    # position bias: "the first one" whatever is shown
                          [0.2, 0.4, 0.1],    # b better in both orders; weighted, principle 0 decides
                          [0.6, 0.5, 0.5]])
    second = torch.tensor([[0.7, 0.6, 0.5],
                           [0.1, 0.1, 0.1],
                           [0.3, 0.4, 0.1],
                           [0.5, 0.5, 0.5]])   # exactly 1/2 in one order: a tie
    v = decide(first, second, weights)
    assert v.a_wins.tolist() == [True, True, False, True]
    assert v.tie.tolist() == [False, True, False, True]
    assert v.prob[0].item() == pytest.approx((0.5 * 0.8 + 0.25 * 0.6 + 0.25 * 0.5))
    assert v.prob[2].item() == pytest.approx(1 - (0.5 * 0.25 + 0.25 * 0.4 + 0.25 * 0.1))
    assert v.principle[0].item() == 0 and v.principle[2].item() == 0
    v = decide(torch.tensor([[0.45, 0.1]]), torch.tensor([[0.45, 0.1]]), [0.9, 0.1])
    assert v.principle.item() == 0  # 0.9 * 0.05 > 0.1 * 0.4
    v = decide(torch.tensor([[0.45, 0.1]]), torch.tensor([[0.45, 0.1]]), [0.5, 0.5])
    assert v.principle.item() == 1


class FakeJudge:
    """compare_both from a table: P(a better) per order, for one principle."""

    def __init__(self, table: dict[tuple[str, str], tuple[float, float]]):
        self.table, self.constitution = table, load_constitution(CONSTITUTION)

    def compare_both(self, prompts, a, b):
        rows = [self.table[(x, y)] for x, y in zip(a, b)]
        return (torch.tensor([[r[0]] * 3 for r in rows]), torch.tensor([[r[1]] * 3 for r in rows]))


def test_label_pairs_drop_or_keep_ties():
    assert candidate_pairs([["x", "y", "x", "  "], ["z"]]) == [(0, "x", "y")]
    rows = [{"prompt": "p", "answer": "1", "margin": 9}]
    groups = [[" a", " b", " c", " a"]]
    judge = FakeJudge({(" a", " b"): (0.8, 0.7), (" a", " c"): (0.9, 0.2), (" b", " c"): (0.3, 0.1)})
    pairs, stats = label_pairs(judge, rows, groups, "drop")
    assert [(p["chosen"], p["rejected"]) for p in pairs] == [(" a", " b"), (" c", " b")]
    assert pairs[0] == {"answer": "1", "prompt": "p", "chosen": " a", "rejected": " b",
                        "judge_prob": pytest.approx(0.75), "judge_margin": pytest.approx(0.5),
                        "principle": "correct", "tie": False}  # the row's own `margin` is not copied
    assert stats["pairs_judged"] == 3 and stats["ties"] == 1 and stats["pairs_written"] == 2
    kept, _ = label_pairs(judge, rows, groups, "keep")
    assert [(p["chosen"], p["tie"], p["label_smoothing"]) for p in kept] == \
        [(" a", False, None), (" a", True, 0.5), (" c", False, None)]


# ---- loading, the reward ----------------------------------------------------------------------------

def test_judge_is_loaded_once_per_process(monkeypatch):
    from align.models import loading

    calls = []
    real = loading.load_model
    monkeypatch.setattr(loading, "load_model", lambda *a, **k: calls.append(1) or real(*a, **k))
    judge_module.clear_cache()
    config = JudgeConfig(model="builtin:tiny-llama", constitution=str(CONSTITUTION), labels=["A", "B"], device="cpu")
    one = load_judge(config)
    assert load_judge(config.model_copy()) is one and len(calls) == 1
    other = load_judge(config.model_copy(update={"batch_size": 2}))
    assert other is not one and other.model is one.model and len(calls) == 1
    with pytest.raises(AlignError, match="label ' A' is not one token"):
        load_judge(config.model_copy(update={"labels": [" A", " B"]}))
    judge_module.clear_cache()


def test_judge_reward_score_and_pairwise(tiny_parts):
    from align.rewards import RewardFunctions, load_reward_function

    kwargs = {"model": "builtin:tiny-llama", "constitution": str(CONSTITUTION), "device": "cpu"}
    score = load_reward_function("judge", kwargs, key="grpo.rewards[0]")
    pairwise = load_reward_function("judge", {**kwargs, "form": "pairwise", "labels": ["A", "B"],
                                              "reference_column": "solution"}, key="grpo.rewards[1]")
    functions = RewardFunctions([score, pairwise], names=["score", "pairwise"])
    prompts, completions = [PROMPT, PROMPT, PROMPT], [" 12", " 13", " Hmm, I am not sure."]
    values = functions(prompts, completions, [[1], [2], [3]], {"solution": [" 12", None, " 12"]})
    judge = make_judge(tiny_parts)
    assert torch.allclose(values[:, 0], judge.combine(judge.score(prompts, completions)), atol=1e-5)
    assert values[:, 0].min() >= 1 and values[:, 0].max() <= 5
    first, second = judge.compare_both([PROMPT, PROMPT], [" 12", " Hmm, I am not sure."], [" 12", " 12"])
    expected = judge.combine((first + second) / 2)
    assert values[0, 1].item() == pytest.approx(expected[0].item(), abs=1e-5)
    assert values[1, 1].isnan()  # no reference: None
    assert values[2, 1].item() == pytest.approx(expected[1].item(), abs=1e-5)
    with pytest.raises(AlignError, match="no column 'reference'"):
        load_reward_function("judge", {**kwargs, "form": "pairwise", "labels": ["A", "B"]})(
            prompts=[PROMPT], completions=[" 1"])
    with pytest.raises(AlignError, match="judge reward kwargs: form"):
        load_reward_function("judge", {**kwargs, "form": "rank"})(prompts=[PROMPT], completions=[" 1"])
    judge_module.clear_cache()


# ---- the data written is what the trainers read ----------------------------------------------------

def write_prompts(tmp_path, n=3) -> str:
    from align.toy import prompt_rows, write_jsonl

    path = tmp_path / "prompts.jsonl"
    write_jsonl(prompt_rows(n, seed=3), path)
    return str(path)


def test_label_command_writes_pairs_dpo_and_reward_read(tmp_path, capsys, arith_builtin):
    from align.config import recipe_from_dict
    from align.data import load_rows
    from align.trainers import TRAINERS

    out = tmp_path / "label"
    args = ["label", str(ROOT / "recipes/feedback/label_tiny.yaml"), "--set", f"output_dir={out}",
            "--set", f"data.path={write_prompts(tmp_path)}", "--set", "sampling.num_samples=3",
            "--set", "ties=keep", "--set", "judge.device=cpu"]
    assert main(args) == 0, capsys.readouterr().err
    rows = [json.loads(line) for line in (out / "pairs.jsonl").read_text().splitlines()]
    assert rows and all({"prompt", "chosen", "rejected", "judge_prob", "judge_margin", "principle", "tie",
                         "label_smoothing", "answer"} <= set(r) for r in rows)
    assert all(0.5 <= r["judge_prob"] <= 1 and r["chosen"] != r["rejected"] for r in rows)
    assert json.loads((out / "stats.json").read_text())["pairs_written"] == len(rows)
    assert main(args) == 2 and "already holds pairs.jsonl" in capsys.readouterr().err  # nothing overwritten
    for algorithm in ("dpo", "reward"):
        recipe = recipe_from_dict({"algorithm": algorithm, "output_dir": str(tmp_path / algorithm),
                                   "model": {"name_or_path": "builtin:tiny-llama"},
                                   "data": {"train": {"path": str(out / "pairs.jsonl")}, "max_length": 128}})
        data, fmt = TRAINERS[algorithm].load_splits(recipe)["data.train"]
        assert fmt == "preference" and len(data) == len(rows)
    assert "margin" not in load_rows(DataSource(path=str(out / "pairs.jsonl"))).column_names


def test_revise_writes_sft_rows(tmp_path, capsys, arith_builtin):
    from align.config import recipe_from_dict
    from align.trainers import TRAINERS

    out = tmp_path / "revise"
    assert main(["revise", str(ROOT / "recipes/feedback/revise_tiny.yaml"), "--set", f"output_dir={out}",
                 "--set", f"data.path={write_prompts(tmp_path, 2)}"]) == 0, capsys.readouterr().err
    rows = [json.loads(line) for line in (out / "sft.jsonl").read_text().splitlines()]
    assert len(rows) == 2 and all({"prompt", "completion", "original", "critique", "principle"} <= set(r) for r in rows)
    recipe = recipe_from_dict({"algorithm": "sft", "output_dir": str(tmp_path / "sft"),
                               "model": {"name_or_path": "builtin:tiny-llama"},
                               "data": {"train": {"path": str(out / "sft.jsonl")}, "max_length": 128}})
    data, fmt = TRAINERS["sft"].load_splits(recipe)["data.train"]
    assert fmt == "prompt_completion" and len(data) == 2


def test_revise_mechanics_with_a_scripted_model():
    """The model's answer, critique and revision are asked for in that order, with the sampled
    principle in the requests; the last revision becomes the completion."""
    constitution = load_constitution(CONSTITUTION)
    seen = []

    def sample(prompts):
        seen.append(prompts)
        return [f" reply{len(seen)}-{i}" for i in range(len(prompts))]

    rows, stats = revise(sample, [{"prompt": "Q1:", "id": 1}, {"prompt": [{"role": "user", "content": "Q2"}]}],
                         constitution, rounds=2, seed=0)
    assert len(seen) == 5  # answer, then (critique, revision) twice
    principle = next(p for p in constitution.principles if p.name == rows[0]["principle"])
    assert seen[3][0] == critique_prompt("Q1:", " reply3-0", principle)  # round 2 critiques round 1's revision
    assert seen[4][0] == revision_prompt("Q1:", " reply3-0", principle, " reply4-0")
    assert principle.text in seen[3][0] and seen[4][0].endswith("Revision:")
    assert seen[4][1][-1]["role"] == "user" and seen[4][1][-2] == {"role": "assistant", "content": "reply4-1"}
    assert rows[0] == {"id": 1, "prompt": "Q1:", "completion": " reply5-0", "original": " reply1-0",
                       "critique": "reply4-0", "principle": principle.name}
    assert stats == {"prompts": 2, "rows_written": 2, "empty_revisions": 0, "changed": 2}


# ---- config errors ----------------------------------------------------------------------------------

@pytest.mark.parametrize("override,message", [
    ("judge.labls=[A, B]", "judge.labls: unknown key; did you mean 'judge.labels'?"),
    ("ties=maybe", "ties: Input should be 'drop' or 'keep'"),
    ("sampling.num_samples=1", "sampling.num_samples: Input should be greater than or equal to 2"),
    ("judge.constitution=nope.md", "file not found: 'nope.md'"),
    ("data.path=nope.jsonl", "file not found: 'nope.jsonl'"),
])
def test_bad_label_configs_exit_2_naming_the_key(override, message, capsys, monkeypatch):
    monkeypatch.chdir(ROOT)
    assert main(["validate", "recipes/feedback/label_tiny.yaml", "--set", override, "--set", "output_dir=/nonexistent/o"]) == 2
    err = capsys.readouterr().err
    assert "recipes/feedback/label_tiny.yaml" in err and message in err


def test_validate_checks_judge_reward_kwargs(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(ROOT)
    assert main(["validate", "recipes/grpo_tiny_judge.yaml", "--set", f"output_dir={tmp_path}/o"]) == 0
    assert "grpo.rewards[1]: judge ok (judge labels ok)" in capsys.readouterr().out
    bad = ("grpo.rewards=[{fn: judge, kwargs: {model: 'builtin:tiny-llama', form: rank, "
           "constitution: recipes/constitutions/helpful_honest.md}}]")
    assert main(["validate", "recipes/grpo_tiny_judge.yaml", "--set", bad]) == 2
    assert "grpo.rewards[0].kwargs: form: Input should be 'pairwise' or 'score'" in capsys.readouterr().err
    assert main(["validate", "recipes/grpo_tiny_judge.yaml", "--set", bad.replace("form: rank", "form: pairwise")]) == 2
    assert "label ' A' is not one token" in capsys.readouterr().err


def test_validate_and_train_tell_task_configs_apart(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(ROOT)
    assert main(["validate", "recipes/feedback/label_tiny.yaml", "--set", f"output_dir={tmp_path}/o"]) == 0
    assert "valid label config" in capsys.readouterr().out
    assert main(["validate", "recipes/feedback/label_tiny.yaml", "--set", f"output_dir={tmp_path}/o",
                 "--set", "judge.labels=[' A', ' B']"]) == 2
    assert "label ' A' is not one token" in capsys.readouterr().err
    assert main(["train", "recipes/feedback/revise_tiny.yaml"]) == 2
    assert "run it with `align revise recipes/feedback/revise_tiny.yaml`" in capsys.readouterr().err
    assert main(["label", "recipes/feedback/revise_tiny.yaml"]) == 2
    assert "is a `revise` config" in capsys.readouterr().err
    assert load_task("recipes/feedback/revise_tiny.yaml").rounds == 1


# ---- the loop closes: a judge Align trains -> label -> DPO -> exact answers -----------------------

@pytest.fixture(scope="module")
def toy_judge(tmp_path_factory, arith_builtin) -> Path:
    """builtin:tiny-judge-arith: the toy arithmetic judge (align.feedback.toy_judge), SFT-trained by
    Align from tiny-llama-arith, built once into the model cache."""
    from align.builtins import build_builtin

    return build_builtin("tiny-judge-arith")


def test_toy_loop_judge_label_dpo_raises_exact_answer_accuracy(toy_judge, tmp_path):
    """builtin:tiny-llama-arith answers 4 times per prompt; the toy judge labels the pairs; DPO on
    them raises the exact-answer accuracy of greedy answers to held-out questions, above DPO on the
    same pairs reversed (for a random judge both would be coin flips and land together). The judge
    is also checked against the ground truth on the pairs it wrote. Seen here: DPO on coin-flipped
    pairs raises greedy accuracy as much (any update breaks the greedy hedge), and the toy judge tells
    worked answers from hedges, not right sums from wrong ones: the loop's direction is the judge's,
    its arithmetic is not."""
    from dataclasses import asdict

    from align.config import recipe_from_dict
    from align.feedback import label
    from align.feedback.config import task_from_dict
    from align.feedback.toy_judge import LABELS, TEMPLATES
    from align.generate import evaluate
    from align.toy import HEDGE, prompt_rows, write_jsonl
    from align.trainers.dpo import DPOTrainer
    from align_rewards.math import exact_answer

    held_out = prompt_rows(128, seed=7)
    seen = {r["prompt"] for r in held_out}
    write_jsonl([r for r in prompt_rows(120, seed=21) if r["prompt"] not in seen][:96], tmp_path / "prompts.jsonl")
    config = task_from_dict({
        "task": "label", "output_dir": str(tmp_path / "label"),
        "model": {"name_or_path": "builtin:tiny-llama-arith", "dtype": "float32"},
        "data": {"path": str(tmp_path / "prompts.jsonl")},
        "sampling": {"num_samples": 4, "max_new_tokens": 24, "temperature": 1.0, "batch_size": 64},
        "judge": {"model": str(toy_judge), "constitution": str(toy_judge / "constitution.md"), "labels": list(LABELS),
                  "templates": asdict(TEMPLATES), "dtype": "float32", "device": "cpu", "batch_size": 128}})
    stats = label.run(config)
    pairs = [json.loads(line) for line in (tmp_path / "label" / "pairs.jsonl").read_text().splitlines()]
    assert len(pairs) == stats["pairs_written"] >= 40 and stats["ties"] > 0
    right = exact_answer([p["chosen"] for p in pairs], [p["answer"] for p in pairs])
    wrong = exact_answer([p["rejected"] for p in pairs], [p["answer"] for p in pairs])
    decisive = [c for c, r in zip(right, wrong) if c != r]
    hedged = [HEDGE in p["chosen"] for p in pairs if (HEDGE in p["chosen"]) != (HEDGE in p["rejected"])]
    assert len(decisive) >= 8 and sum(decisive) / len(decisive) >= 0.85  # the right answer is chosen
    assert len(hedged) >= 20 and sum(hedged) / len(hedged) <= 0.1  # the hedge is rejected

    def dpo_accuracy(pairs_file: Path, name: str) -> float:
        recipe = recipe_from_dict({
            "algorithm": "dpo", "output_dir": str(tmp_path / name),
            "model": {"name_or_path": "builtin:tiny-llama-arith", "dtype": "float32"},
            "adapter": {"kind": "lora", "r": 16, "alpha": 32, "dropout": 0.0},
            "data": {"train": {"path": str(pairs_file)}, "max_length": 64},
            "train": {"lr": 2e-3, "max_steps": 30, "batch_size": 16, "warmup": 0.1, "schedule": "cosine",
                      "progress": False, "plots": False, "seed": 0},
            "dpo": {"beta": 0.1}})
        DPOTrainer.from_recipe(recipe).fit()
        return evaluate(str(tmp_path / name), held_out, ["exact_answer"], max_new_tokens=24).means["exact_answer"]

    # the control: the same pairs with every preference reversed (a judge that wants the opposite)
    write_jsonl([{**p, "chosen": p["rejected"], "rejected": p["chosen"]} for p in pairs], tmp_path / "reversed.jsonl")
    before = evaluate("builtin:tiny-llama-arith", held_out, ["exact_answer"], max_new_tokens=24).means["exact_answer"]
    after = dpo_accuracy(tmp_path / "label" / "pairs.jsonl", "dpo")
    control = dpo_accuracy(tmp_path / "reversed.jsonl", "dpo_reversed")
    print(f"exact-answer accuracy on {len(held_out)} held-out prompts: {before:.3f} -> {after:.3f} with the judge's "
          f"pairs, {control:.3f} with them reversed; {len(pairs)} pairs, {stats['ties']} ties")
    assert after >= before + 0.05 and after >= control + 0.05


def test_a_prompt_longer_than_max_prompt_length_is_refused_naming_its_row():
    from align.feedback.config import LabelSampling
    from align.feedback.policy import Sampler

    tokenizer = AutoTokenizer.from_pretrained(tiny.resolve("builtin:tiny-llama"))
    sampler = Sampler(model=None, tokenizer=tokenizer, engine=None, sampling=LabelSampling(max_prompt_length=4))
    with pytest.raises(AlignError, match=r"prompts row 1: the prompt has \d+ tokens, more than sampling.max_prompt_length=4"):
        sampler.sample(["Hi", "a prompt of many more tokens than four"], key="prompts")
