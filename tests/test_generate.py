"""align generate / align eval on builtin:tiny-llama-arith (trained by Align on first use)."""

from __future__ import annotations

import json
import math

import pytest
import torch

from align.cli import main
from align.errors import AlignError
from align.generate import encode, evaluate, generate, load

pytestmark = pytest.mark.usefixtures("arith_builtin")  # builtin:tiny-llama-arith, trained once

ARITH = "builtin:tiny-llama-arith"
QUESTION = "Question: What is 2 + 3?\nAnswer:"


@pytest.fixture(scope="module")
def arith():
    return load(ARITH, dtype="float32")


def test_greedy_generation_is_deterministic_and_answers(arith):
    first = generate(arith, [QUESTION, "Question: What is 7 - 4?\nAnswer:"], max_new_tokens=20)
    assert len(first) == 2 and all(isinstance(t, str) and t for t in first)
    assert generate(arith, [QUESTION, "Question: What is 7 - 4?\nAnswer:"], max_new_tokens=20) == first
    assert all("answer" in t or "not sure" in t for t in first)  # its two styles, trained by Align


def test_samples_are_grouped_per_prompt_and_seeded(arith):
    texts = generate(arith, [QUESTION, QUESTION], max_new_tokens=8, temperature=1.0, n=3, seed=1)
    assert len(texts) == 6
    assert generate(arith, [QUESTION, QUESTION], max_new_tokens=8, temperature=1.0, n=3, seed=1) == texts
    with pytest.raises(AlignError, match="identical completions"):
        generate(arith, [QUESTION], n=2)


def test_prompts_are_encoded_like_training(arith):
    tok = arith.tokenizer
    assert encode(tok, [QUESTION]) == [tok(QUESTION, add_special_tokens=True)["input_ids"]]
    messages = [{"role": "user", "content": "What is 2 + 3?"}]
    expected = tok.apply_chat_template(messages, tokenize=True, return_dict=True, add_generation_prompt=True)
    assert encode(tok, ["What is 2 + 3?"], chat=True) == encode(tok, [messages]) == [list(expected["input_ids"])]
    with pytest.raises(AlignError, match="no prompts"):
        encode(tok, [])


def test_lora_adapter_dir_loads_merged(arith, tmp_path):
    """An adapter output dir generates like its base when the adapter is the identity (B = 0)."""
    from peft import LoraConfig, get_peft_model

    from align.config import AdapterConfig, ModelConfig
    from align.models.loading import load_model

    base = load_model(ModelConfig(name_or_path=ARITH, dtype="float32"), AdapterConfig(kind="none"))
    get_peft_model(base, LoraConfig(r=4, target_modules="all-linear")).save_pretrained(tmp_path / "run")
    arith.tokenizer.save_pretrained(tmp_path / "run")
    assert (tmp_path / "run" / "adapter_config.json").exists()
    assert generate(str(tmp_path / "run"), [QUESTION], max_new_tokens=12) == generate(arith, [QUESTION],
                                                                                       max_new_tokens=12)


def test_evaluate_scores_greedy_completions(arith, tmp_path):
    rows = [{"prompt": f"Question: What is {a} + {b}?\nAnswer:", "answer": str(a + b)} for a, b in [(1, 2), (3, 4)]]
    rows.append({"prompt": "Question: What is 5 - 1?\nAnswer:", "answer": None})
    reward_file = tmp_path / "my_reward.py"
    reward_file.write_text("def has_digit(completions, **_):\n    return [float(any(c.isdigit() for c in t)) "
                           "for t in completions]\n")
    result = evaluate(arith, rows, ["exact_answer", f"{reward_file}:has_digit"], max_new_tokens=24)
    assert result.names == ["exact_answer", "my_reward.has_digit"] and result.scores.shape == (3, 2)
    assert math.isnan(result.scores[2, 0])  # None: no reference answer
    means = result.means
    assert set(means) == {"exact_answer", "my_reward.has_digit", "total"}
    assert means["exact_answer"] == pytest.approx(result.scores[:2, 0].mean().item())
    assert result.completions == generate(arith, [r["prompt"] for r in rows], max_new_tokens=24)
    with pytest.raises(AlignError, match="`prompt` column"):
        evaluate(arith, [{"question": "hi"}], ["exact_answer"])


def test_the_total_leaves_out_completions_no_function_scored():
    """As training's `reward`: a completion every function returned None for has no reward, not 0."""
    from align.generate import Evaluation

    nan = math.nan
    result = Evaluation(["a", "b"], torch.tensor([[1.0, nan], [nan, 2.0], [nan, nan]]), [{}] * 3, ["x"] * 3)
    assert result.means == {"a": 1.0, "b": 2.0, "total": 1.5}
    assert math.isnan(Evaluation(["a", "b"], torch.full((1, 2), nan), [{}], ["x"]).means["total"])


def test_cli_generate_and_eval(tmp_path, capsys, monkeypatch):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(json.dumps({"prompt": QUESTION}) + "\n")
    assert main(["generate", ARITH, "--prompt", "Question: What is 1 + 1?\nAnswer:", "--file", str(prompts),
                 "--max-new-tokens", "8", "--dtype", "float32"]) == 0
    out = capsys.readouterr().out
    assert "### prompt 0: Question: What is 1 + 1?" in out and "### prompt 1:" in out

    data = tmp_path / "eval.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"Question: What is {a} + 1?\nAnswer:", "answer": str(a + 1)}) + "\n"
                            for a in range(4)))
    results = tmp_path / "results.jsonl"
    assert main(["eval", ARITH, "--data", str(data), "--reward", "exact_answer", "--max-new-tokens", "16",
                 "--limit", "3", "--out", str(results)]) == 0
    out = capsys.readouterr().out
    assert "3 prompts" in out and "exact_answer: " in out
    lines = [json.loads(line) for line in results.read_text().splitlines()]
    assert len(lines) == 3 and {"prompt", "answer", "completion", "rewards"} <= set(lines[0])

    assert main(["eval", ARITH, "--data", str(data), "--reward", "exact_answr"]) == 2
    assert "Did you mean 'exact_answer'" in capsys.readouterr().err
    for out, why in ((results, "already exists"), (data, "already exists"), (tmp_path / "no" / "r.jsonl", "does not exist")):
        assert main(["eval", ARITH, "--data", str(data), "--reward", "exact_answer", "--out", str(out)]) == 2
        assert why in capsys.readouterr().err  # (it wrote over any file, the data itself; a missing folder: a traceback)
    assert len(results.read_text().splitlines()) == 3 and len(data.read_text().splitlines()) == 4
    assert main(["generate", str(tmp_path), "--prompt", "hi"]) == 2
    assert "holds no model" in capsys.readouterr().err
    assert main(["generate", ARITH]) == 2
    assert "no prompts" in capsys.readouterr().err


def test_generation_leaves_torch_rng_alone(arith):
    torch.manual_seed(0)
    expected = torch.rand(3)
    torch.manual_seed(0)
    generate(arith, [QUESTION], max_new_tokens=4, temperature=1.0, seed=5)
    assert torch.equal(torch.rand(3), expected)
