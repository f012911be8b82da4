import json
import os

import pytest
import torch

from align.errors import AlignError
from align.plot import read_metrics
from align.trainers import SFTTrainer
from align.trainers import checkpoint


def test_a_crash_during_a_save_leaves_the_previous_checkpoint_intact(tmp_path):
    root = tmp_path / "checkpoints"
    checkpoint.save_checkpoint(root, 1, {"model": {"w": torch.ones(2)}}, {"note": "first"}, keep=2)

    def crash(directory):
        raise KeyboardInterrupt  # killed half-way through writing step 2

    with pytest.raises(KeyboardInterrupt):
        checkpoint.save_checkpoint(root, 2, {"model": {"w": torch.zeros(2)}}, {}, keep=2, write_extra=crash)
    assert [p.name for p in checkpoint.list_checkpoints(root)] == ["step-000001"]
    state, tensors = checkpoint.load_checkpoint(root / "step-000001")
    assert state["note"] == "first" and torch.equal(tensors["model"]["w"], torch.ones(2))
    checkpoint.clean_staging(root)
    assert sorted(p.name for p in root.iterdir()) == ["step-000001"]


def test_only_the_newest_checkpoints_are_kept(tmp_path):
    for step in range(1, 5):
        checkpoint.save_checkpoint(tmp_path, step, {"x": torch.tensor(step)}, {}, keep=2)
    assert [p.name for p in checkpoint.list_checkpoints(tmp_path)] == ["step-000003", "step-000004"]


def test_resume_from_an_explicit_path_that_is_not_a_checkpoint(make_recipe, tmp_path):
    recipe = make_recipe(train={"resume_from": str(tmp_path)})
    with pytest.raises(AlignError, match="not a complete checkpoint"):
        SFTTrainer.from_recipe(recipe).fit()


class RunsCode:
    """A pickle that runs code when loaded: it makes the directory `marker`."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.mkdir, (str(self.marker),)


def test_loading_a_checkpoint_never_unpickles(tmp_path):
    handed = tmp_path / "step-000001"
    handed.mkdir()
    (handed / checkpoint.STATE_FILE).write_text(json.dumps({"step": 1}))
    torch.save({"w": RunsCode(tmp_path / "pwned")}, handed / "model.pt")
    with pytest.raises(AlignError, match="never loaded: they can run code"):
        checkpoint.load_checkpoint(handed)
    assert not (tmp_path / "pwned").exists()


def test_a_damaged_checkpoint_is_detected_and_the_one_before_it_is_loaded(tmp_path, caplog):
    for step in (1, 2):
        checkpoint.save_checkpoint(tmp_path, step, {"model": {"w": torch.full((64,), float(step))}}, {}, keep=3,
                                   run_id="r")
    tensors = tmp_path / "step-000002" / checkpoint.TENSORS_FILE
    data = bytearray(tensors.read_bytes())
    data[-1] ^= 1  # one flipped bit, same size: only the checksum sees it
    tensors.write_bytes(bytes(data))
    with pytest.raises(AlignError, match="damaged"):
        checkpoint.load_checkpoint(tmp_path / "step-000002")
    path, state, objects = checkpoint.load_newest(tmp_path, "r")
    assert path.name == "step-000001" and torch.equal(objects["model"]["w"], torch.ones(64))
    assert "step-000002" in caplog.text and "trying the one before it" in caplog.text


def test_resume_after_a_kill_mid_write_falls_back_to_the_previous_checkpoint(make_recipe, tmp_path, caplog):
    """The newest checkpoint truncated and the last metrics line cut short (a kill during both
    writes): `auto` resumes from the checkpoint before it, and the run ends as one straight run."""
    settings = dict(train={"max_steps": 4, "save_every": 2, "log_every": 1})
    straight = make_recipe(output_dir=str(tmp_path / "straight"), **settings)
    SFTTrainer.from_recipe(straight).fit()
    SFTTrainer.from_recipe(make_recipe(**settings)).fit()
    run = tmp_path / "run"
    newest = max((run / "checkpoints" / "step-000004").iterdir(), key=lambda p: p.stat().st_size)
    newest.write_bytes(newest.read_bytes()[: newest.stat().st_size // 2])
    with open(run / "metrics.jsonl", "a") as f:
        f.write('{"step": 5, "lo')
    resumed = make_recipe(**settings)
    resumed.train.resume_from = "auto"
    trainer = SFTTrainer.from_recipe(resumed)
    trainer.fit()
    assert "step-000004" in caplog.text and "trying the one before it" in caplog.text
    want, got = read_metrics(tmp_path / "straight"), read_metrics(run)
    assert [r["step"] for r in got] == [1, 2, 3, 4]
    for a, b in zip(want, got):
        assert a["loss"] == pytest.approx(b["loss"], abs=1e-5)


def test_a_resume_on_a_model_or_data_changed_since_the_checkpoint_is_refused(make_recipe, tmp_path):
    """runs/base trained again into the same directory (or the data edited) after a checkpoint: the
    resumed run would go on from the old weights on the new inputs. Unchanged inputs resume."""
    from align.models.loading import load_model, load_tokenizer
    from align.config import AdapterConfig, ModelConfig

    base = ModelConfig(name_or_path="builtin:tiny-llama", dtype="float32")
    model, tokenizer = load_model(base, AdapterConfig()), load_tokenizer(base)
    model.save_pretrained(tmp_path / "base")
    tokenizer.save_pretrained(tmp_path / "base")
    settings = dict(model={"name_or_path": str(tmp_path / "base"), "dtype": "float32"},
                    adapter={"kind": "lora", "r": 4}, train={"max_steps": 4, "save_every": 2})
    SFTTrainer.from_recipe(make_recipe(**settings)).fit()
    checkpoint_dir = tmp_path / "run" / "checkpoints" / "step-000002"
    state = json.loads((checkpoint_dir / checkpoint.STATE_FILE).read_text())
    assert set(state["inputs"]) == {"model.name_or_path", "data.train.path"}
    resumed = make_recipe(**settings)
    resumed.train.resume_from = str(checkpoint_dir)
    SFTTrainer.from_recipe(resumed).fit()  # the same inputs: resumes
    with torch.no_grad():
        model.model.layers[0].mlp.down_proj.weight.mul_(1.01)  # the base "trained again"
    model.save_pretrained(tmp_path / "base")
    with pytest.raises(AlignError, match=r"train.resume_from: .*step-000002 was trained on other inputs than these "
                                         r"files hold now: model.name_or_path \('.*base'\) changed since"):
        SFTTrainer.from_recipe(resumed).fit()
    trainer_data = tmp_path / "train.jsonl"
    trainer_data.write_text(trainer_data.read_text().replace("4", "5"))
    with pytest.raises(AlignError, match=r"data.train.path \('.*train.jsonl'\), model.name_or_path"):
        SFTTrainer.from_recipe(resumed).fit()


def test_what_is_an_input_and_what_a_run_writes_is_not(tmp_path, monkeypatch):
    """Fingerprints leave out what changes under a run that did nothing wrong: its own output_dir
    inside the model's directory, a reward package's __pycache__, hidden folders; a chat template's
    text, a stop string "/" and a split named like a folder are no inputs."""
    from align.trainers.inputs import input_fingerprints

    monkeypatch.chdir(tmp_path)
    base, rewards = tmp_path / "base", tmp_path / "myrewards"
    for folder in (base, rewards, tmp_path / "train"):
        folder.mkdir()
    (base / "model.safetensors").write_bytes(os.urandom(1000))
    (rewards / "__init__.py").write_text("def score(completions, **_): return [0.0] * len(completions)\n")
    recipe = {"output_dir": str(base / "stage2"),
              "model": {"name_or_path": "base", "chat_template": "{{ '" + "x" * 300 + "/' }}" + "y" * 300},
              "data": {"train": {"path": "base/model.safetensors", "split": "train"}},
              "grpo": {"sampling": {"stop": ["/"]}, "rewards": [{"fn": "myrewards:score", "kwargs": {"sep": "./"}}]}}
    before = input_fingerprints(recipe)
    assert set(before) == {"model.name_or_path", "data.train.path", "grpo.rewards[0].fn"}
    for written in (base / "stage2" / "checkpoints" / "step-000002" / "x", rewards / "__pycache__" / "a.pyc",
                    base / ".cache" / "y"):
        written.parent.mkdir(parents=True)
        written.write_text("written by the run")
    assert input_fingerprints(recipe) == before
    (rewards / "__init__.py").write_text("def score(completions, **_): return [1.0] * len(completions)\n")
    assert input_fingerprints(recipe) == {**before, "grpo.rewards[0].fn": input_fingerprints(recipe)["grpo.rewards[0].fn"]}
    assert input_fingerprints(recipe)["grpo.rewards[0].fn"] != before["grpo.rewards[0].fn"]


def test_rows_written_by_each_process_are_read_by_any_share(tmp_path):
    """fsdp checkpoints: each process writes its rows of a sharded tensor (torch.chunk's split, the
    last share empty when there are fewer rows than shares); a process resuming on another number of
    processes reads its rows across the writers' files."""
    from align.models.sharding import shard_rows

    whole = torch.arange(7 * 3, dtype=torch.float32).reshape(7, 3)
    pieces = {}
    for processes in (3, 5, 8):
        (tmp_path / str(processes)).mkdir()
        for process in range(processes):
            start, stop = shard_rows(7, processes, process)
            sums = checkpoint._write_rows(tmp_path / str(processes),
                                          {"w": checkpoint.RowShard(whole[start:stop], start, (7, 3))},
                                          process, processes)
            assert list(sums) == [checkpoint.rows_file(process, processes)]
        pieces[processes] = checkpoint._stored_pieces(tmp_path / str(processes), None)["w"]
    assert [shape for _, shape, _ in pieces[8]] == [(1, 3)] * 7 + [(0, 3)]
    for processes, written in pieces.items():
        stored = checkpoint.StoredRows("w", (7, 3), written)
        assert torch.equal(stored.whole(), whole)
        for start in range(8):
            for stop in range(start, 8):
                assert torch.equal(stored.rows(start, stop), whole[start:stop]), (processes, start, stop)
    with pytest.raises(checkpoint.UnusableCheckpoint, match=r"do not hold rows 0-7 of shape \[7, 3\] once each"):
        checkpoint.StoredRows("w", (7, 3), pieces[3][:1] + pieces[3][2:])  # a writer's file missing
    with pytest.raises(checkpoint.UnusableCheckpoint, match="once each"):
        checkpoint.StoredRows("w", (7, 4), pieces[3])  # another trailing shape
    with pytest.raises(AlignError, match=r"process 1 does not see .* \(a filesystem they share\)"):
        checkpoint._write_rows(tmp_path / "absent", {"w": checkpoint.RowShard(whole, 0, (7, 3))}, 1, 2)


def test_a_checkpoint_with_rows_loads_them_whole_or_on_demand_and_checks_their_files(tmp_path):
    shard = checkpoint.RowShard(torch.arange(6.0).reshape(3, 2), 0, (3, 2))
    for step in (1, 2):
        checkpoint.save_checkpoint(tmp_path, step, {"model": {"w": shard, "b": torch.ones(2)}}, {}, keep=3, run_id="r")
    step2 = tmp_path / "step-000002"
    assert sorted(p.name for p in step2.iterdir()) == sorted([checkpoint.rows_file(0, 1), checkpoint.STATE_FILE,
                                                              checkpoint.TENSORS_FILE])
    _, objects = checkpoint.load_checkpoint(step2)
    assert torch.equal(objects["model"]["w"], shard.local) and torch.equal(objects["model"]["b"], torch.ones(2))
    _, lazy = checkpoint.load_checkpoint(step2, lazy=True)
    assert isinstance(lazy["model"]["w"], checkpoint.StoredRows)
    assert torch.equal(lazy["model"]["w"].rows(1, 3), shard.local[1:])
    rows = step2 / checkpoint.rows_file(0, 1)
    rows.write_bytes(rows.read_bytes()[:-1] + bytes([rows.read_bytes()[-1] ^ 1]))
    path, _, _ = checkpoint.load_newest(tmp_path, "r")  # damaged rows: the checkpoint before it
    assert path.name == "step-000001"
    _, lazy = checkpoint.load_checkpoint(step2, lazy=True, rows_when_read=True)  # a resuming process's view:
    with pytest.raises(checkpoint.UnusableCheckpoint, match="damaged"):     # checked as it reads them
        lazy["model"]["w"].rows(0, 1)


TWO_WRITERS = """
import errno, sys
from pathlib import Path
import torch
from align.errors import AlignError
from align.trainers import checkpoint
from align.trainers.processes import process_accelerator

process = process_accelerator().process_index  # two processes, as the trainers start them
root = Path(sys.argv[1])

def rows(step):  # this process's row of a 2 x 2 tensor
    return {"w": checkpoint.RowShard(torch.full((1, 2), float(10 * step + process)), process, (2, 2))}

checkpoint.save_checkpoint(root, 1, {"model": rows(1), "b": torch.ones(2)}, {}, keep=3, run_id="r")
if process == 1:  # its disk is full at the next save
    def full_disk(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")
    checkpoint.write_safetensors_streaming = full_disk
try:
    checkpoint.save_checkpoint(root, 2, {"model": rows(2), "b": torch.ones(2)}, {}, keep=3, run_id="r")
except AlignError as error:
    print(f"process {process} raised: {error}")
if process == 1:  # then a failure nobody expects (a bug): that process raises it, the other an AlignError
    def bug(*args, **kwargs):
        raise RuntimeError("a bug in the writer")
    checkpoint.write_safetensors_streaming = bug
try:
    checkpoint.save_checkpoint(root, 3, {"model": rows(3), "b": torch.ones(2)}, {}, keep=3, run_id="r")
except Exception as error:
    print(f"process {process} raised {type(error).__name__}: {error}")
torch.distributed.destroy_process_group()  # not left to the interpreter's exit, which may abort
"""


def test_a_write_failing_on_one_process_leaves_no_checkpoint_and_every_process_raises(tmp_path):
    """fsdp checkpoints have a writer per process: one process's full disk (or a bug in its writer)
    fails the save on every process (none waits forever, none goes on as if saved), and the earlier
    checkpoint stays whole."""
    import subprocess
    import sys

    from tests.test_distributed import REPO

    (tmp_path / "writers.py").write_text(TWO_WRITERS)
    env = {**os.environ, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                             str(tmp_path / "writers.py"), str(tmp_path / "checkpoints")],
                            cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
    for process in (0, 1):
        assert f"process {process} raised: could not write checkpoint step 2" in result.stdout
    assert result.stdout.count("No space left on device; the earlier checkpoints there are intact") == 2
    assert "process 1 raised RuntimeError: a bug in the writer" in result.stdout
    assert "process 0 raised AlignError: could not write checkpoint step 3" in result.stdout
    assert "RuntimeError: a bug in the writer; the earlier checkpoints there are intact" in result.stdout
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step-000001"]  # no staging left
    _, objects = checkpoint.load_checkpoint(tmp_path / "checkpoints" / "step-000001")
    torch.testing.assert_close(objects["model"]["w"], torch.tensor([[10.0, 10.0], [11.0, 11.0]]))


def test_the_streaming_writer_writes_what_safetensors_reads(tmp_path):
    """Rows files are written a tensor at a time (bounded host memory): every stored dtype, empty and
    strided tensors read back bit for bit, with the metadata."""
    from safetensors import safe_open

    base = torch.randn(4, 6)
    tensors = {"f32": base, "bf16": base.bfloat16(), "f16": base.half(), "f64": base.double()[:, :5],
               "i64": torch.arange(7), "u8": torch.arange(5, dtype=torch.uint8), "bool": base > 0,
               "empty": torch.zeros(0, 6), "strided": base.t(), "scalar": torch.tensor(3.5)}
    path = tmp_path / "rows.safetensors"
    digest = checkpoint.write_safetensors_streaming(path, tensors, {"f32": "0", "note": "x"})
    assert digest == checkpoint.sha256(path)  # computed while writing
    with safe_open(str(path), "pt") as stored:
        assert stored.metadata() == {"f32": "0", "note": "x"}
        assert sorted(stored.keys()) == sorted(tensors)
        for name, tensor in tensors.items():
            got = stored.get_tensor(name)
            assert got.dtype == tensor.dtype and torch.equal(got, tensor), name
    with pytest.raises(TypeError, match="complex64 is not stored"):
        checkpoint.write_safetensors_streaming(path, {"c": torch.zeros(2, dtype=torch.complex64)}, {})
