"""align plot: one PNG per metric family present, clear errors for missing or empty metrics."""

from __future__ import annotations

import json
import sys

import pytest

from align.cli import main
from align.errors import AlignError
from align.plot import family_of, plot_metrics

PNG = b"\x89PNG\r\n\x1a\n"


def write_metrics(run_dir, records, tail: str = "") -> None:
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records) + tail)


def grpo_like_records(steps: int = 6) -> list[dict]:
    records = []
    for step in range(1, steps + 1):
        record = {"step": step, "epoch": step / 10, "loss": 1.0 / step, "lr": 1e-3, "grad_norm": 0.5,
                  "entropy": 0.3, "kl": 0.01 * step, "reward": 0.1 * step, "rewards/exact_answer/mean": 0.1 * step,
                  "rewards/brevity/mean": 0.5, "rewards/total/mean": 0.1 * step, "tokens_per_s": 1000.0,
                  "completions/mean_length": 12.0, "completions/min_length": 8.0, "completions/max_length": 20.0}
        if step % 3 == 0:
            record.update({"eval/reward": 0.2 * step, "eval/rewards/exact_answer/mean": 0.2 * step,
                           "eval/completions/mean_length": 11.0})
        records.append(record)
    return records


def test_writes_one_png_per_family_present(tmp_path):
    run = tmp_path / "run"
    write_metrics(run, grpo_like_records())
    written = plot_metrics(run)
    names = [p.name for p in written]
    assert names == ["loss.png", "lr.png", "reward.png", "kl.png", "grad_norm.png", "entropy.png",
                     "completion_length.png"]
    for path in written:
        assert path.parent == run / "plots" and path.read_bytes().startswith(PNG)


def test_dpo_and_sft_keys_and_out_dir(tmp_path):
    run = tmp_path / "run"
    records = [{"step": s, "loss": 0.7, "lr": 1e-3, "rewards/accuracy": 0.6, "rewards/margin": 0.1,
                "rewards/chosen": 0.05, "rewards/rejected": -0.05} for s in (1, 2, 3)]
    records[-1].update({"eval/loss": 0.6, "eval/rewards/accuracy": 0.7})
    write_metrics(run, records)
    written = plot_metrics(run / "metrics.jsonl", tmp_path / "figures")
    assert [p.name for p in written] == ["loss.png", "lr.png", "reward.png", "accuracy.png"]
    assert all(p.parent == tmp_path / "figures" for p in written)


def test_families():
    assert family_of("eval/loss") == family_of("value_loss") == "loss"
    assert family_of("rewards/accuracy") == family_of("eval/accuracy") == "accuracy"
    assert family_of("rewards/exact_answer/mean") == family_of("eval/reward") == "reward"
    assert family_of("rewards/total/mean") is None and family_of("tokens_per_s") is None
    assert family_of("completions/mean_length") == "length"


def test_missing_or_empty_metrics_are_clear_errors(tmp_path, capsys):
    with pytest.raises(AlignError, match="no metrics file"):
        plot_metrics(tmp_path / "nowhere")
    write_metrics(tmp_path / "empty", [], tail="\n")
    with pytest.raises(AlignError, match="holds no metrics yet"):
        plot_metrics(tmp_path / "empty")
    assert main(["plot", str(tmp_path / "empty")]) == 2
    assert "no metrics yet" in capsys.readouterr().err


def test_truncated_last_line_is_skipped_and_bad_lines_named(tmp_path):
    write_metrics(tmp_path / "a", grpo_like_records(2), tail='{"step": 3, "lo')
    assert plot_metrics(tmp_path / "a")
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "metrics.jsonl").write_text('{"step": 1, "lo\n{"step": 2, "loss": 1.0}\n')
    with pytest.raises(AlignError, match="line 1 is not JSON"):
        plot_metrics(tmp_path / "b")


def test_no_plottable_keys(tmp_path):
    write_metrics(tmp_path, [{"step": 1, "tokens_per_s": 5.0}])
    with pytest.raises(AlignError, match="no plottable metrics"):
        plot_metrics(tmp_path)


def test_without_matplotlib_says_what_to_install(tmp_path, monkeypatch):
    write_metrics(tmp_path, grpo_like_records(2))
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)
    with pytest.raises(AlignError, match=r"pip install 'align\[plot\]'"):
        plot_metrics(tmp_path)


def test_cli_prints_the_files(tmp_path, capsys):
    write_metrics(tmp_path, grpo_like_records(3))
    assert main(["plot", str(tmp_path), "--out", str(tmp_path / "png")]) == 0
    printed = capsys.readouterr().out.split()
    assert printed[0].endswith("loss.png") and all((tmp_path / "png" / p.rsplit("/", 1)[-1]).exists() for p in printed)


def test_a_run_writes_a_baseline_eval_and_its_plots(make_recipe, tmp_path):
    import json

    from align.toy import chat_rows
    from align.trainers import SFTTrainer

    recipe = make_recipe(eval_rows=chat_rows(8, seed=9), train={"plots": True, "eval_at_start": True, "max_steps": 2})
    trainer = SFTTrainer.from_recipe(recipe)
    trainer.fit()
    records = [json.loads(line) for line in open(trainer.output_dir / "metrics.jsonl")]
    assert records[0]["step"] == 0 and "eval/loss" in records[0]
    assert (trainer.output_dir / "plots" / "loss.png").stat().st_size > 1000
