import asyncio
import math
import time

import pytest
import torch

from align.config import AdapterConfig, ModelConfig, RewardFunctionConfig
from align.errors import AlignError
from align.rewards import REGISTRY, RewardFunctions, load_reward_function, register, spec_name
from align_rewards.format import format_regex, format_tags
from align_rewards.length import length_penalty, overlong_penalty
from align_rewards.math import exact_answer, extract_answer, numeric_answer, parse_number

USER_FILE = "tests/data/my_rewards.py"
NAN = float("nan")


def batch(completions, answers=None, prompts=None):
    """(prompts, completions, completion_ids, columns) for RewardFunctions, one row per completion."""
    prompts = prompts or [f"Question: q{i}\nAnswer:" for i in range(len(completions))]
    answers = answers if answers is not None else ["19"] * len(completions)
    return prompts, completions, [[1] * len(c.split()) for c in completions], {"answer": answers}


# ------------------------------------------------------------------------------------------- built-ins

@pytest.mark.parametrize("text, expected", [
    (" 12 + 7 = 19. The answer is 19.", "19"),
    ("so the result is \\boxed{\\frac{1}{2}}.", "\\frac{1}{2}"),
    ("\\boxed{1} then \\boxed{x^{2} + {y}}", "x^{2} + {y}"),   # the last box, nested braces
    ("\\boxed{12", "12"),                                       # cut off inside the box: last number
    ("5 apples and 3 pears\n#### 1,000", "1,000"),
    ("The answer is $1,000.", "1,000"),
    ("The answer is 3.50.", "3.50"),
    ("Final answer: -2", "-2"),
    ("The answer is **42** apples.", "42"),
    ("The answer is Paris.", "Paris"),
    ("I got 3, then 1,234,567 and -5.", "-5"),
    ("half is 1/2", "1/2"),
    ("no digits here", None),
])
def test_extract_answer(text, expected):
    assert extract_answer(text) == expected


@pytest.mark.parametrize("text, value", [("1,000", 1000.0), ("3.50", 3.5), ("-2", -2.0), ("1/2", 0.5),
                                          ("\\frac{3}{4}", 0.75), ("$5", 5.0), ("50%", 50.0), ("1/0", None),
                                          ("abc", None)])
def test_parse_number(text, value):
    assert parse_number(text) == value


def test_exact_and_numeric_answer():
    completions = [" 12 + 7 = 19. The answer is 19.", "The answer is 18.", "The answer is 19.", "#### 1,000",
                   "The answer is 3.50.", "The answer is 0.5", "nothing"]
    answers = ["19", "19", None, "1000", "3.5", "1/2", "4"]
    assert exact_answer(completions, answers) == [1.0, 0.0, None, 1.0, 0.0, 0.0, 0.0]
    assert numeric_answer(completions, answers) == [1.0, 0.0, None, 1.0, 1.0, 1.0, 0.0]
    # int answers, GSM8K-style worked solutions as the gold answer, tolerance, non-numeric gold
    assert exact_answer(["The answer is 7."], [7]) == [1.0]
    assert exact_answer(["so 42"], ["3 * 14 = 42\n#### 42"]) == [1.0]
    assert numeric_answer(["The answer is 3.14"], ["3.14159"], tolerance=1e-2) == [1.0]
    assert numeric_answer(["The answer is 3.14"], ["3.14159"]) == [0.0]
    assert numeric_answer(["The answer is Paris."], ["Paris"]) == [None]


def test_format_rewards():
    good = "<think>7 + 5 is 12</think>\n<answer>12</answer>"
    assert format_tags([good, "<answer>12</answer><think>x</think>", "<think>x</think>", "plain"]) == [1.0, 0.0, 0.0, 0.0]
    assert format_tags(["<answer>1</answer>"], tags="answer") == [1.0]
    pattern = r"<think>.*</think>\s*<answer>.*</answer>"
    assert format_regex([good, "  " + good + "\n", good + " trailing"], pattern) == [1.0, 1.0, 0.0]
    assert format_regex([good + " trailing"], pattern, fullmatch=False) == [1.0]
    with pytest.raises(AlignError, match="invalid pattern"):
        format_regex(["x"], "(")


def test_length_rewards():
    ids = [[0] * n for n in (5, 10, 12, 20)]
    assert length_penalty(ids, target=10, scale=0.5) == [0.0, 0.0, -0.1, -0.5]
    # DAPO soft overlong punishment: max_length 10, buffer 4 -> 0 up to 6, linear to -penalty at 10
    ids = [[0] * n for n in (3, 6, 7, 8, 10, 11)]
    assert overlong_penalty(ids, max_length=10, buffer=4) == [0.0, 0.0, -0.25, -0.5, -1.0, -1.0]
    assert overlong_penalty(ids[2:3], max_length=10, buffer=4, penalty=2.0) == [-0.5]
    with pytest.raises(AlignError, match="buffer"):
        overlong_penalty(ids, max_length=10, buffer=0)


# ------------------------------------------------------------------------------------------- loading

def test_load_by_registry_name_module_and_file(monkeypatch):
    monkeypatch.chdir(__file__.rsplit("/tests/", 1)[0])
    assert set(REGISTRY) >= {"exact_answer", "numeric_answer", "format_tags", "format_regex", "length_penalty",
                             "overlong_penalty"}
    assert load_reward_function("exact_answer") is exact_answer
    assert load_reward_function("align_rewards.math:exact_answer") is exact_answer
    concise = load_reward_function(f"{USER_FILE}:concise")
    assert concise(["short", "x" * 41]) == [1.0, 0.0]
    assert load_reward_function(f"{USER_FILE}:concise") is concise  # the file is executed once
    assert [spec_name(s) for s in ("exact_answer", "align_rewards.math:exact_answer", "rewards/math.py:exact_answer",
                                   f"{USER_FILE}:concise", "pkg.my_mod:f")] == [
        "exact_answer", "exact_answer", "math.exact_answer", "my_rewards.concise", "my_mod.f"]


def test_kwargs_are_bound_and_checked(monkeypatch):
    monkeypatch.chdir(__file__.rsplit("/tests/", 1)[0])
    starts = load_reward_function(f"{USER_FILE}:starts_with", {"prefix": " 12"})
    assert starts.__name__ == "starts_with"
    rewards = RewardFunctions([starts, load_reward_function("overlong_penalty", {"max_length": 4, "buffer": 2})])
    assert rewards.names == ["starts_with", "overlong_penalty"]
    values = rewards(*batch([" 12 + 7", " 3 + 4 = 7 ok"]))
    assert values.tolist() == [[1.0, -0.5], [0.0, -1.0]]  # 3 and 6 "tokens"
    with pytest.raises(AlignError, match=r"grpo.rewards\[0\].kwargs: starts_with has no parameter 'prefx'; did you "
                                         r"mean 'prefix'\? Its parameters: completions, prefix"):
        load_reward_function(f"{USER_FILE}:starts_with", {"prefx": " 12"}, key="grpo.rewards[0]")
    with pytest.raises(AlignError, match="format_tags has no parameter 'tag'; did you mean 'tags'"):
        load_reward_function("format_tags", {"tag": ["answer"]})  # **_ swallows columns, not typos


def test_reward_model_directory_is_a_reward(tmp_path):
    from align.models.reward import RewardModel

    RewardModel.from_config(ModelConfig(name_or_path="builtin:tiny-llama", dtype="float32"), AdapterConfig()).save(
        tmp_path / "rm")
    rewards = RewardFunctions.from_config([RewardFunctionConfig(fn=str(tmp_path / "rm"), kwargs={"batch_size": 2,
                                                                                          "device": "cpu"}),
                                           RewardFunctionConfig(fn="exact_answer")])
    assert rewards.names == ["rm", "exact_answer"]
    args = batch([" 1 + 1 = 2. The answer is 2.", " Hmm.", " The answer is 19."])
    rewards.dry_run(*args)
    values = rewards(*args)
    assert values.shape == (3, 2) and values[:, 0].isfinite().all()
    assert values[:, 1].tolist() == [0.0, 0.0, 1.0]
    with pytest.raises(AlignError, match="no config.json"):
        load_reward_function(str(tmp_path))


def test_only_a_reward_model_directory_loads_as_a_reward(tmp_path, monkeypatch):
    """A LoRA reward-model run (an adapter, no config.json) is a reward; a causal LM, full or an adapter
    of one (e.g. an SFT run), is refused: loaded as a reward model its score head would be random."""
    from transformers import AutoModelForSequenceClassification

    from align.models import tiny
    from align.models.loading import load_model
    from align.models.reward import RewardModel, load_reward_model

    lora = AdapterConfig(kind="lora", r=4, dropout=0.0)
    RewardModel.from_config(ModelConfig(name_or_path="builtin:tiny-llama", dtype="float32"), lora).save(tmp_path / "rm")
    scorer = load_reward_function(str(tmp_path / "rm"), {"device": "cpu"})
    assert len(scorer(["1 + 1 ="], [" 2"])) == 1

    causal_lm = tiny.resolve("builtin:tiny-llama")
    load_model(ModelConfig(name_or_path="builtin:tiny-llama", dtype="float32"), lora).save_pretrained(tmp_path / "sft")
    AutoModelForSequenceClassification.from_pretrained(causal_lm, num_labels=3).save_pretrained(tmp_path / "three")
    for path, message in [(causal_lm, "holds a LlamaForCausalLM, not a reward model"),
                          (tmp_path / "sft", "holds a CAUSAL_LM adapter, not a reward model"),
                          (tmp_path / "three", "is a classifier of 3 labels")]:
        with pytest.raises(AlignError, match=message):
            load_reward_function(str(path))
        with pytest.raises(AlignError, match=message):
            load_reward_model(str(path))
    monkeypatch.setenv("HOME", str(tmp_path))  # (last: the built-ins' cache may sit under HOME)
    assert load_reward_model("~/rm", device="cpu")(["1 + 1 ="], [" 2"]) == scorer(["1 + 1 ="], [" 2"])


@pytest.mark.parametrize("spec, message", [
    ("exact_anwser", "Did you mean 'exact_answer'"),
    ("align_rewards.math.exact_answer", "Did you mean 'align_rewards.math:exact_answer'"),
    ("no_such_module:f", "no module named 'no_such_module'"),
    ("align_rewards.math:exact", "has no function 'exact'. Did you mean 'exact_answer'"),
    ("missing/file.py:f", "file not found: 'missing/file.py'"),
    ("runs/no-such-rm", "There is no such file or directory"),
    ("align_rewards.math:NUMBER", "'align_rewards.math': NUMBER is a str, not a function"),
    ("pyproject.toml", "It is a file: give a reward-model run's directory, or a Python file with its function"),
])
def test_unresolvable_specs_name_the_key_and_the_accepted_forms(spec, message):
    entries = [RewardFunctionConfig(fn="exact_answer"), RewardFunctionConfig(fn=spec)]
    with pytest.raises(AlignError) as error:
        RewardFunctions.from_config(entries, key="grpo.rewards")
    text = str(error.value)
    assert text.startswith("grpo.rewards[1].fn: ") and message in text, text
    if spec in ("exact_anwser", "no_such_module:f", "runs/no-such-rm"):
        assert "module:func" in text and "file.py:func" in text and "reward-model directory" in text
    with pytest.raises(AlignError, match=r"ppo.rewards is empty"):
        RewardFunctions.from_config([], key="ppo.rewards")


def test_register_and_unique_names():
    @register("always_one")
    def always_one(completions, **_):
        return [1.0] * len(completions)

    try:
        assert load_reward_function("always_one") is always_one
        with pytest.raises(AlignError, match="already registered"):
            register("always_one")(exact_answer)
        rewards = RewardFunctions.from_config([RewardFunctionConfig(fn="always_one"),
                                               RewardFunctionConfig(fn="always_one", name="mine"),
                                               RewardFunctionConfig(fn="always_one")])
        assert rewards.names == ["always_one", "mine", "always_one_2"]
    finally:
        del REGISTRY["always_one"]


# ------------------------------------------------------------------------------------------- calling

def test_columns_and_only_declared_parameters_are_passed():
    seen = {}

    def takes_all(prompts, completions, completion_ids, **columns):
        seen["all"] = sorted(columns)
        return [0.0] * len(completions)

    def takes_some(completions, difficulty, unused_default=3):
        seen["some"] = (difficulty, unused_default)
        return [float(d) for d in difficulty]

    prompts, completions, ids, columns = batch(["a", "b"])
    values = RewardFunctions([takes_all, takes_some])(prompts, completions, ids, {**columns, "difficulty": [1, 2]})
    assert seen == {"all": ["answer", "difficulty"], "some": ([1, 2], 3)}
    assert values[:, 1].tolist() == [1.0, 2.0]
    # a kwarg bound in the recipe wins over a dataset column of the same name
    overlong = load_reward_function("overlong_penalty", {"max_length": 4, "buffer": 2})
    values = RewardFunctions([overlong])(prompts, completions, [[0] * 3, [0] * 9], {"max_length": [100, 100]})
    assert values[:, 0].tolist() == [-0.5, -1.0]


def test_combine_weights_and_none():
    def half(completions, **_):
        return [0.5, None, 1.0, None]

    def minus(completions, **_):
        return [-1.0, 2.0, None, None]

    rewards = RewardFunctions([half, minus], weights=[2.0, 0.5])
    values = rewards(*batch(["a", "b", "c", "d"]))
    assert torch.equal(values.isnan(), torch.tensor([[False, False], [True, False], [False, True], [True, True]]))
    combined = rewards.combine(values)  # a row where every function returned None has no reward: NaN, not 0
    assert combined[:3].tolist() == [2 * 0.5 - 0.5, 1.0, 2.0] and combined[3].isnan()
    metrics = rewards.metrics(values)
    assert metrics["rewards/half/mean"] == 0.75  # std unbiased, as TRL's and reward_std
    assert metrics["rewards/half/std"] == pytest.approx(torch.tensor([0.5, 1.0]).std().item())
    assert metrics["rewards/half/none"] == 0.5 and metrics["rewards/minus/mean"] == 0.5
    assert metrics["rewards/total/mean"] == pytest.approx((0.5 + 1 + 2) / 3)  # over the scored rows only
    assert metrics["rewards/total/std"] == pytest.approx(torch.tensor([0.5, 1.0, 2.0]).std().item())
    assert metrics["rewards/total/none"] == 0.25


def test_combine_warns_once_about_rows_without_any_reward(caplog):
    rewards = RewardFunctions([lambda completions, **_: [None, 1.0]])
    values = rewards(*batch(["a", "b"]))
    with caplog.at_level("WARNING"):
        rewards.combine(values)
        rewards.combine(values)
    messages = [r.getMessage() for r in caplog.records if "returned None" in r.getMessage()]
    assert len(messages) == 1 and "NaN" in messages[0] and "advantage 0" in messages[0]


def test_async_rewards_run_concurrently_also_inside_a_running_loop(monkeypatch):
    monkeypatch.chdir(__file__.rsplit("/tests/", 1)[0])

    async def other_judge(completions, **_):
        await asyncio.sleep(0.2)
        return [0.5] * len(completions)

    judge = load_reward_function(f"{USER_FILE}:slow_judge")
    rewards = RewardFunctions([judge, other_judge, exact_answer])
    args = batch(["The answer is 19.", "The answer is 7."])
    start = time.perf_counter()
    values = rewards(*args)
    assert time.perf_counter() - start < 0.35
    assert values.tolist() == [[1.0, 0.5, 1.0], [0.0, 0.5, 0.0]]

    async def inside_a_loop():  # e.g. a notebook: the caller already runs an event loop
        return rewards(*args)

    assert asyncio.run(inside_a_loop()).tolist() == values.tolist()
    rewards.close()


# ------------------------------------------------------------------------------------------- errors

def raises(completions, **_):
    raise ValueError("boom")


def wrong_length(completions, **_):
    return [1.0]


def returns_nan(completions, **_):
    return [NAN] * len(completions)


def returns_string(completions, **_):
    return ["1.0"] * len(completions)


def returns_float(completions, **_):
    return 1.0


def needs_rubric(completions, rubric):
    return [0.0] * len(completions)


@pytest.mark.parametrize("fn, message", [
    (raises, "raised ValueError: boom\n  at row 0 of the batch\n  prompt: 'Question: q0\\nAnswer:'"),
    (wrong_length, "returned 1 value(s) for 2 completions"),
    (returns_nan, "returned nan; values must be finite numbers"),
    (returns_string, "returned str '1.0'; values must be numbers"),
    (returns_float, "returned float 1.0; a reward function returns a list"),
    (needs_rubric, "requires a parameter 'rubric', which is neither one of prompts, completions, completion_ids "
                   "nor a dataset column (columns: answer)"),
    (length_penalty, "requires a parameter 'target'"),  # **_ does not hide a missing required parameter
])
def test_dry_run_errors_name_the_function(fn, message):
    rewards = RewardFunctions([exact_answer, fn], keys=["grpo.rewards[0]", "grpo.rewards[1]"])
    with pytest.raises(AlignError) as error:
        rewards.dry_run(*batch(["The answer is 19.", "The answer is 7."]))
    assert str(error.value).startswith(f"dry run before training: reward function {fn.__name__!r} (grpo.rewards[1]) ")
    assert message in str(error.value), str(error.value)


def test_train_time_exception_names_the_function_and_the_row():
    def picky(prompts, completions, answer):
        for completion in completions:
            if "7" in completion:
                raise KeyError("seven")
        return [1.0] * len(completions)

    rewards = RewardFunctions([exact_answer, picky], names=["exact", "picky"])
    with pytest.raises(AlignError) as error:
        rewards(*batch(["The answer is 19.", "The answer is 19.", "The answer is 7."],
                       prompts=["p0", "p1", [{"role": "user", "content": "What is 3 + 4?"}]]))
    text = str(error.value)
    assert text.startswith("reward function 'picky' raised KeyError: 'seven'\n  at row 2 of the batch"), text
    assert "prompt: 'What is 3 + 4?'" in text and "completion: 'The answer is 7.'" in text
    assert isinstance(error.value.__cause__, KeyError)

    def batch_only(completions, **_):
        if len(completions) > 1:
            raise RuntimeError("batch too big")
        return [1.0]

    with pytest.raises(AlignError, match="'batch_only' raised RuntimeError: batch too big\n  on the batch of 2 rows "
                                         r"\(each row alone succeeds\)"):
        RewardFunctions([batch_only])(*batch(["a", "b"]))

    def bad_row(completions, **_):
        return [1.0, math.inf]

    with pytest.raises(AlignError, match=r"'bad_row' returned inf\b.*\n  at row 1"):
        RewardFunctions([bad_row])(*batch(["a", "b"]))


def test_a_reward_model_reading_another_tokenizer_than_the_policy_s_is_refused():
    """The scorer reads the policy's sampled ids as its own tokens: another vocabulary scored other text
    (or an IndexError), another EOS took every finished completion for an unfinished one."""
    from align.models.loading import load_model, load_tokenizer
    from align.models.reward import RewardModel, RewardScorer

    config = ModelConfig(name_or_path="builtin:tiny-llama", dtype="float32")
    policy_tokenizer, other = load_tokenizer(config), load_tokenizer(config)
    other.add_tokens(["<new-token>"])
    model = load_model(config, AdapterConfig(), head="score")
    model.resize_token_embeddings(len(other))
    rewards = RewardFunctions([RewardScorer(RewardModel(model, other))], names=["rm"], keys=["grpo.rewards[0]"])
    with pytest.raises(AlignError, match=r"reward function 'rm' \(grpo.rewards\[0\]\): the reward model's tokenizer "
                                         "has another vocabulary than the policy's"):
        rewards.match_policy(policy_tokenizer, [policy_tokenizer.eos_token_id])
    same = RewardScorer(RewardModel.from_config(config, AdapterConfig()))
    same.match_policy(policy_tokenizer, [policy_tokenizer.eos_token_id], "rm")
    policy_tokenizer.eos_token = policy_tokenizer.convert_ids_to_tokens(0)  # (<|pad|>; EOS is <|im_end|>)
    with pytest.raises(AlignError, match="another end-of-sequence token"):
        same.match_policy(policy_tokenizer, [policy_tokenizer.eos_token_id], "rm")


def test_a_tokenizer_with_more_tokens_than_the_model_s_embedding_is_refused(tmp_path):
    """(An IndexError traceback in the forward; on a GPU a device-side assert.)"""
    from align.models.loading import load_tokenizer
    from align.models.policy import Policy

    tokenizer = load_tokenizer(ModelConfig(name_or_path="builtin:tiny-llama"))
    tokenizer.add_tokens(["<new-token>"])
    tokenizer.save_pretrained(tmp_path / "tok")
    config = ModelConfig(name_or_path="builtin:tiny-llama", tokenizer=str(tmp_path / "tok"), dtype="float32")
    with pytest.raises(AlignError, match=r"model.tokenizer: the tokenizer has \d+ tokens, more than the model's \d+ "
                                         "embedding rows"):
        Policy.from_config(config, AdapterConfig())


def test_a_positional_only_parameter_is_named_as_such():
    """(its message said 'prompts' was neither 'prompts' nor a column)"""
    from align.rewards.calling import arguments_for

    def reward(prompts, completions, /):
        return [0.0] * len(completions)

    with pytest.raises(AlignError, match="'prompts' is positional-only .* drop the `/`"):
        arguments_for(reward, {"prompts": ["p"], "completions": ["c"]}, "reward")
