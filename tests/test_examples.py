import importlib.util
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def load(name):
    spec = importlib.util.spec_from_file_location(name, ROOT / "examples" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_python_api_example_trains_a_subclassed_trainer(tmp_path, monkeypatch):
    monkeypatch.chdir(ROOT)
    record = load("python_api_sft").main(str(tmp_path / "out"), max_steps=4)
    assert "confidence" in record and record["loss"] > 0
    assert (tmp_path / "out" / "adapter_model.safetensors").exists()


def test_custom_dpo_loss_example(tmp_path, monkeypatch):
    monkeypatch.chdir(ROOT)
    record = load("custom_dpo_loss").main(str(tmp_path / "out"), max_steps=4)
    assert {"rewards/margin", "eval/rewards/accuracy"} <= set(record) and record["loss"] > 0
    assert (tmp_path / "out" / "adapter_model.safetensors").exists()


def test_grpo_custom_reward_example(tmp_path, monkeypatch):
    monkeypatch.chdir(ROOT)
    record = load("grpo_custom_reward").main(str(tmp_path / "out"), max_steps=2)
    assert "rewards/careful/mean" in record and "eval/reward" in record
    assert (tmp_path / "out" / "metrics.jsonl").exists()


def test_my_reward_scores_answers_and_hedges():
    careful_answer = load("my_reward").careful_answer
    assert careful_answer([" 2 + 3 = 5. The answer is 5.", " 2 + 3 = 6.", " Hmm, I am not sure.", "x"],
                          ["5", "5", "5", None], hedge_penalty=0.5) == [1.0, 0.0, -0.5, None]


def test_evaluate_and_generate_example(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(ROOT)
    scores = load("evaluate_and_generate").main(str(tmp_path / "out"), max_steps=2, limit=4)
    assert set(scores) == {"before", "after"} and all(0.0 <= v <= 1.0 for v in scores.values())
    assert "exact_answer" in capsys.readouterr().out
