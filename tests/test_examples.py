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
