"""Bad input gets a clear error (exit code 2, no traceback, the file, key or row named), and
`align validate` catches it before any model loads."""

import json
import os

import pytest
import yaml

from align.cli import main
from align.config import AdapterConfig, DataSource, ModelConfig, saved_recipe_now
from align.errors import AlignError
from align.toy import chat_rows, preference_rows, prompt_completion_rows, prompt_rows
from tests.conftest import write_jsonl


def cli(capsys, *argv) -> tuple[int, str]:
    code = main(list(argv))
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return code, err


@pytest.fixture
def recipe_file(make_recipe, tmp_path):
    """recipe_file(**sections) -> the path of a small SFT recipe YAML (sections deep-merged)."""

    def write(**sections) -> str:
        path = tmp_path / "recipe.yaml"
        path.write_text(yaml.safe_dump(make_recipe(raw=True, rows=chat_rows(8), **sections)))
        return str(path)

    return write


# 1. duplicate keys ------------------------------------------------------------------------------
@pytest.mark.parametrize("text, key, lines", [
    ("algorithm: sft\noutput_dir: {out}\nmodel: {{name_or_path: 'builtin:tiny-llama'}}\n"
     "data: {{train: {{path: {data}}}}}\ntrain:\n  lr: 1.0e-3\ntrain:\n  epochs: 2\n", "train", (5, 7)),
    ("algorithm: sft\noutput_dir: {out}\nmodel: {{name_or_path: 'builtin:tiny-llama'}}\n"
     "data: {{train: {{path: {data}}}}}\ntrain:\n  lr: 1.0e-3\n  epochs: 2\n  lr: 3.0e-3\n", "lr", (6, 8)),
])
def test_a_key_given_twice_is_named_with_both_lines(tmp_path, capsys, text, key, lines):
    data = write_jsonl(tmp_path / "train.jsonl", chat_rows(4))
    path = tmp_path / "recipe.yaml"
    path.write_text(text.format(out=tmp_path / "run", data=data))
    for command in ("validate", "train"):
        code, err = cli(capsys, command, str(path))
        assert code == 2
        assert f"recipe.yaml: key {key!r} is given twice" in err and f"(lines {lines[0]} and {lines[1]})" in err


# 2. bad YAML in --set ---------------------------------------------------------------------------
def test_a_set_value_that_is_not_yaml_names_the_set_text(recipe_file, capsys):
    code, err = cli(capsys, "validate", recipe_file(), "--set", "train.lr=[1,")
    assert code == 2 and "--set 'train.lr=[1,': the value '[1,' is not valid YAML" in err


def test_set_indexes_a_list_of_sections():
    """(`--set 'grpo.rewards[0].weight=2'` was an unknown key; there was no way to change one reward)"""
    from align.config import apply_overrides

    raw = {"grpo": {"rewards": [{"fn": "a"}, {"fn": "b", "weight": 1.0}]}}
    assert apply_overrides(raw, ["grpo.rewards[1].weight=0.5"])["grpo"]["rewards"][1] == {"fn": "b", "weight": 0.5}
    with pytest.raises(AlignError, match=r"'grpo.rewards' has 2 entries; set the whole list instead"):
        apply_overrides(raw, ["grpo.rewards[2].weight=1"])


# 3. data files ----------------------------------------------------------------------------------
@pytest.mark.parametrize("command", ["validate", "train"])
@pytest.mark.parametrize("name, text", [("empty.jsonl", ""), ("empty.jsonl", "\n\n"), ("empty.csv", ""),
                                        ("empty.csv", "\n"), ("empty.parquet", "")])
def test_an_empty_data_file_is_named(recipe_file, tmp_path, capsys, command, name, text):
    """(0-byte and blank csv files gave datasets' "An error occurred while generating the dataset")"""
    (tmp_path / name).write_text(text)
    code, err = cli(capsys, command, recipe_file(data={"train": {"path": str(tmp_path / name)}}))
    assert code == 2 and "data.train.path" in err and f"{name}' holds no rows" in err, err


@pytest.mark.parametrize("command", ["validate", "train"])
def test_bytes_that_are_not_utf8_are_named_with_their_line(recipe_file, tmp_path, capsys, command):
    path = tmp_path / "latin1.jsonl"
    lines = [json.dumps({"text": "plain"}).encode()] * 2 + ['{"text": "café"}'.encode("latin-1")]
    path.write_bytes(b"\n".join(lines) + b"\n")
    code, err = cli(capsys, command, recipe_file(data={"train": {"path": str(path)}}))
    assert code == 2 and "latin1.jsonl' line 3 (byte 0xe9" in err and "not UTF-8" in err


@pytest.mark.parametrize("command", ["validate", "train"])
def test_a_column_of_mixed_types_names_the_column_and_row(recipe_file, tmp_path, capsys, command):
    rows = prompt_completion_rows(4)
    rows[2]["completion"] = 7
    path = write_jsonl(tmp_path / "mixed.jsonl", rows)
    code, err = cli(capsys, command, recipe_file(data={"train": {"path": path}}))
    assert code == 2 and "data.train row 2: column 'completion' must be a string" in err and "got int 7" in err


def test_validate_tokenizes_the_data_and_names_a_reply_the_chat_template_hides(recipe_file, capsys, monkeypatch):
    """With the tokenizer on the machine, `align validate` tokenizes every split as training would:
    a chat template whose generation prompt prefills `<think>` (DeepSeek-R1's way) is refused there,
    naming the row and the turn, and no model loads."""
    import align.models.loading as loading

    prefill = ("{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' }}"
               "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n<think>' }}{% endif %}")
    monkeypatch.setattr(loading, "load_model", lambda *a, **k: pytest.fail("validate loaded a model"))
    assert main(["validate", recipe_file()]) == 0
    assert "data.train: 8 rows, format messages, 8 examples tokenized" in capsys.readouterr().out
    code, err = cli(capsys, "validate", recipe_file(model={"chat_template": prefill}))
    assert code == 2 and "data.train row 0: assistant turn 2: the chat template's generation prompt" in err
    assert "'<|im_start|>assistant\\n<think>' is not how it begins the turn" in err


def test_wrong_row_types_are_named_for_every_format(tmp_path):
    from align.data import load_rows

    cases = {"text": [{"text": "a"}, {"text": None}],
             "messages": [{"messages": [{"role": "user", "content": "a"}]}, {"messages": "hi"}],
             "prompt": [{"prompt": "a", "chosen": "b", "rejected": "c"}, {"prompt": ["a"], "chosen": "b", "rejected": "c"}],
             "rejected": [{"prompt": "a", "chosen": "b", "rejected": "c"}, {"prompt": "a", "chosen": "b", "rejected": 3}]}
    for column, rows in cases.items():
        source = DataSource(path=write_jsonl(tmp_path / f"{column}.jsonl", rows))
        with pytest.raises(AlignError, match=f"data.train row 1: .*['`]{column}['`]"):
            load_rows(source)
    renamed = DataSource(path=write_jsonl(tmp_path / "renamed.jsonl", [{"body": "a"}, {"body": 1}]),
                         columns={"body": "text"})
    with pytest.raises(AlignError, match=r"row 1: column 'text' \(renamed from 'body'\)"):
        load_rows(renamed)


@pytest.mark.parametrize("role, meant", [("gpt", "assistant"), ("Assistant", "assistant"), ("model", "assistant"),
                                         ("human", "user"), ("USER", "user")])
def test_a_reply_or_prompt_under_another_role_name_is_refused_naming_the_role(recipe_file, capsys, tmp_path,
                                                                            role, meant):
    """(such a reply was read as context: a ShareGPT-style file trained on no reply, or on some)"""
    rows = chat_rows(4)
    rows[2]["messages"] = [{"role": "user" if meant == "assistant" else role, "content": "What is 2+2?"},
                           {"role": role if meant == "assistant" else "assistant", "content": "4"}]
    data = write_jsonl(tmp_path / "roles.jsonl", rows)
    code, err = cli(capsys, "validate", recipe_file(data={"train": {"path": data}}))
    assert code == 2 and f"data.train row 2: `messages` has a message of role {role!r}" in err
    assert f"name it {meant!r}" in err
    tools = [{"role": "user", "content": "Weather?"}, {"role": "tool", "content": "sunny"},
             {"role": "assistant", "content": "Sunny."}]
    from align.data.chat import check_messages
    check_messages(tools, 0, "data.train")  # other roles are context, as before


@pytest.mark.parametrize("where", ["file", "directory"])
def test_a_csv_is_read_as_the_text_it_holds_and_kto_labels_as_bools(tmp_path, where):
    """(pandas' guess made an answer "007" 7.0, a column of integers with a blank cell floats, and a
    completion "42" an int that the format check refused)"""
    from align.data import load_rows

    folder = tmp_path / "data"
    folder.mkdir()
    (folder / "train.csv").write_text('prompt,completion,answer,label\n"What is 6*7?",42,007,true\n'
                                      "Name zero.,zero,,FALSE\nOne?,1,1,1\nNone?,0,0.50,0\n")
    rows = load_rows(DataSource(path=str(folder / "train.csv" if where == "file" else folder)))
    assert rows["completion"] == ["42", "zero", "1", "0"]
    assert rows["answer"] == ["007", None, "1", "0.50"]
    assert rows["label"] == [True, False, True, False]
    (folder / "train.csv").write_text("prompt,completion,label\nA?,a,yes\n")
    assert load_rows(DataSource(path=str(folder)))["label"] == ["yes"]  # left for kto's check to name
    # a reward margin and a tie's own label_smoothing are numbers (a blank cell: none); pandas' index column
    (folder / "train.csv").write_text(",prompt,chosen,rejected,margin,label_smoothing\n0,Q?, a, b,0.5,\n1,R?, c, d,,0.5\n")
    (folder / "test.csv").write_text("prompt,chosen,rejected\nS?, e, f\n")  # another split, other columns
    rows = load_rows(DataSource(path=str(folder / "train.csv" if where == "file" else folder)))
    assert rows["margin"] == [0.5, None] and rows["label_smoothing"] == [None, 0.5] and rows["Unnamed: 0"] == ["0", "1"]
    assert load_rows(DataSource(path=str(folder), split="test"))["prompt"] == ["S?"]


@pytest.mark.parametrize("name, hint", [("train.jsnl", "(did you mean '.jsonl'?)"), ("train.txt", "")])
def test_a_local_file_with_an_unknown_suffix_is_not_taken_for_a_hub_id(recipe_file, tmp_path, monkeypatch, capsys,
                                                                       name, hint):
    from align.data import load_rows

    monkeypatch.chdir(tmp_path)
    write_jsonl(tmp_path / name, chat_rows(4))
    for path in (name, "data/missing.jsonlines"):  # one on disk; one not, with a suffix close to .jsonl
        code, err = cli(capsys, "validate", recipe_file(data={"train": {"path": path}}))
        assert code == 2 and f"data.train.path: {path!r}: unsupported file type" in err
        assert ".jsonl, .json, .parquet, .csv" in err
    assert hint in cli(capsys, "validate", recipe_file(data={"train": {"path": name}}))[1]
    with pytest.raises(AlignError, match="data.path: 'train.jsnl': unsupported file type '.jsnl'"):
        load_rows(DataSource(path="train.jsnl"), key="data")


# 4. numeric ranges ------------------------------------------------------------------------------
@pytest.mark.parametrize("override", ["train.seed=-1", "train.epochs=.inf", "train.lr=.inf",
                                      "train.max_grad_norm=-1", "adapter.alpha=-32"])
def test_numbers_out_of_range_are_refused_with_the_key(recipe_file, capsys, override):
    code, err = cli(capsys, "validate", recipe_file(), "--set", override)
    assert code == 2 and f"  {override.split('=')[0]}: " in err


@pytest.mark.parametrize("override", ["train.lr=true", "train.batch_size=true", "adapter.r=true",
                                      "data.max_length=true", "train.adam_betas=[false, 0.999]"])
def test_a_bool_is_not_taken_for_a_number(recipe_file, capsys, override):
    """pydantic's lax mode read `lr: true` as a learning rate of 1.0, `batch_size: true` as 1, a beta
    of false as 0."""
    code, err = cli(capsys, "validate", recipe_file(), "--set", override)
    key, value = override.split("=")
    assert code == 2 and f"  {key}: {'false' if 'false' in value else 'true'} is not a number" in err, err
    assert main(["validate", recipe_file(), "--set", "model.gradient_checkpointing=true"]) == 0  # a bool's own key


def test_packing_false_is_refused_where_it_would_change_nothing(recipe_file, capsys):
    """Only sft reads it; the other trainers pack their pairs and groups wherever that is exact."""
    assert cli(capsys, "validate", recipe_file(), "--set", "data.packing=false")[0] == 0
    code, err = cli(capsys, "validate", recipe_file(), "--set", "data.packing=false", "--set", "algorithm=dpo")
    assert code == 2 and "data.packing: false pads one example per row for sft only; dpo packs its" in err, err


def test_a_reward_weight_that_is_not_a_number_is_refused(recipe_file, capsys):
    """`weight: .nan` used to turn every reward into 0 (nansum) without a word."""
    for weight in (".nan", ".inf"):
        code, err = cli(capsys, "validate", recipe_file(), "--set", "algorithm=grpo",
                        "--set", f"grpo.rewards=[{{fn: exact_answer, weight: {weight}}}]")
        assert code == 2 and "grpo.rewards.0.weight: Input should be a finite number" in err, err


# 5. output_dir ----------------------------------------------------------------------------------
def test_validate_refuses_an_output_dir_that_is_a_file(recipe_file, tmp_path, capsys):
    (tmp_path / "taken").write_text("a file")
    for output_dir in ("taken", "taken/run"):
        code, err = cli(capsys, "validate", recipe_file(output_dir=str(tmp_path / output_dir)))
        assert code == 2 and "taken' is a file, not a directory" in err


def test_validate_refuses_an_output_dir_that_cannot_be_written(recipe_file, capsys):
    """/proc takes no new directory, even from root (chmod does not stop root)."""
    code, err = cli(capsys, "validate", recipe_file(output_dir="/proc/align-test/run"))
    assert code == 2 and "output_dir '/proc/align-test/run': '/proc' is not writable" in err


def test_validate_refuses_another_runs_output_dir_unless_resumed(recipe_file, tmp_path, capsys):
    run = tmp_path / "old-run"
    run.mkdir()
    (run / "run.json").write_text(json.dumps({"run_id": "abc123", "started": "2025-01-01T00:00:00"}))
    (run / "metrics.jsonl").write_text('{"step": 1, "loss": 1.0, "run_id": "abc123"}\n')
    path = recipe_file(output_dir=str(run))
    code, err = cli(capsys, "validate", path)
    assert code == 2 and "already holds a run (run abc123" in err and "train.resume_from=auto" in err
    assert cli(capsys, "validate", path, "--set", "train.resume_from=auto")[0] == 0
    assert cli(capsys, "validate", path, "--overwrite")[0] == 0
    assert sorted(p.name for p in run.iterdir()) == [".align.lock", "metrics.jsonl", "run.json"]


# 6. adapter settings ----------------------------------------------------------------------------
@pytest.mark.parametrize("adapter, message", [
    ({"target_modules": ["q_proj", "typo_proj"]},
     "adapter.target_modules: the model has no module 'typo_proj'; its linear modules are ['down_proj', "
     "'gate_proj', 'k_proj', 'lm_head', 'o_proj', 'q_proj', 'up_proj', 'v_proj']"),
    ({"modules_to_save": ["lm_haed"]}, "adapter.modules_to_save: the model has no module 'lm_haed'"),
    ({"r": 128}, "adapter.r: 128 is larger than every targeted layer's narrower side (the widest is 64)"),
])
def test_adapter_names_and_rank_are_checked_by_validate_and_by_loading(recipe_file, capsys, adapter, message):
    from align.models.loading import load_model

    settings = {"kind": "lora", "r": 8, **adapter}
    code, err = cli(capsys, "validate", recipe_file(adapter=settings))
    assert code == 2 and message in err
    with pytest.raises(AlignError, match=message.split(":")[0]):
        load_model(ModelConfig(name_or_path="builtin:tiny-llama"), AdapterConfig(**settings))


def test_validate_checks_the_adapter_on_a_meta_skeleton():
    from align.models.loading import model_skeleton

    skeleton = model_skeleton(ModelConfig(name_or_path="builtin:tiny-llama"))
    assert {p.device.type for p in skeleton.parameters()} == {"meta"}
    assert model_skeleton(ModelConfig(name_or_path="nobody/not-in-the-cache")) is None  # checked by train later


# 7. generate flags ------------------------------------------------------------------------------
@pytest.mark.parametrize("flag, value", [("--temperature", "-1"), ("--top-p", "0"), ("--top-p", "1.5"),
                                         ("--n", "0"), ("--max-new-tokens", "0")])
def test_generate_flags_out_of_range_exit_2_before_the_model_loads(capsys, flag, value):
    code, err = cli(capsys, "generate", "builtin:no-such-model", "--prompt", "hi", flag, value)
    assert code == 2 and f"error: {flag}={float(value) if flag in ('--temperature', '--top-p') else value}: must be" in err
    assert "built-in" not in err  # the model was never looked up


# 8. an adapter on another base ------------------------------------------------------------------
def test_an_adapter_trained_on_another_base_names_the_dir_the_base_and_the_shapes(tmp_path, capsys):
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    from align.models.loading import load_model

    other = LlamaConfig(vocab_size=512, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                        num_attention_heads=4, num_key_value_heads=2)  # tiny-llama's names, half its width
    directory = tmp_path / "adapter"
    get_peft_model(LlamaForCausalLM(other), LoraConfig(r=4, target_modules=["q_proj"])).save_pretrained(directory)
    config_file = directory / "adapter_config.json"
    config_file.write_text(json.dumps({**json.loads(config_file.read_text()),
                                       "base_model_name_or_path": "builtin:tiny-llama"}))
    message = (f"the adapter in {str(directory)!r} was not trained on the base its adapter_config.json names "
               "(builtin:tiny-llama): 4 of its weights have other shapes, e.g. "
               "model.layers.0.self_attn.q_proj.lora_A.weight is [4, 32] in the adapter and [4, 64] in the base")
    with pytest.raises(AlignError) as error:
        load_model(ModelConfig(name_or_path=str(directory), dtype="float32"), AdapterConfig())
    assert message in str(error.value)
    code, err = cli(capsys, "generate", str(directory), "--prompt", "hi")
    assert code == 2 and message in err


@pytest.mark.parametrize("kwargs, message", [
    ("{device: banana}", "grpo.rewards[0].kwargs.device: 'banana' is not a device (cpu, cuda, cuda:1, ...)"),
    ("{device: 'cuda:7'}", "grpo.rewards[0].kwargs.device: 'cuda:7', but this machine has"),
    ("{temperature: 0.5}", "grpo.rewards[0].kwargs: a reward model takes only dtype, batch_size, device and "
                           "shard, not temperature"),
    ("{shard: 1}", "grpo.rewards[0].kwargs.shard: 1 is not true or false"),
    ("{shard: true, device: cpu}", "shard and device together"),  # (under train.sharding: fsdp, set below)
    ("{shard: true}", "grpo.rewards[0].kwargs.shard: true shards the reward model like the policy: it needs "
                      "train.sharding: fsdp"),
])
def test_a_reward_models_settings_are_checked_before_it_loads(make_recipe, tmp_path, capsys, kwargs, message):
    """A reward-model directory is placed where its `device` says (validate cannot load it: it may
    not be trained yet, but its settings are checked)."""
    recipe = tmp_path / "grpo.yaml"
    recipe.write_text(yaml.safe_dump(make_recipe(raw=True, algorithm="grpo", rows=prompt_rows(8),
                                                 grpo={"group_size": 4, "rewards": [{"fn": "exact_answer"}]})))
    sharding = ["--set", "train.sharding=fsdp"] if "device: cpu" in kwargs else []
    code, err = cli(capsys, "validate", str(recipe), *sharding,
                    "--set", f"grpo.rewards=[{{fn: {tmp_path / 'rm'}, kwargs: {kwargs}}}]")
    assert code == 2 and message in err, err


def test_validate_reads_a_trained_builtin_s_tokenizer_from_its_untrained_base(monkeypatch, tmp_path):
    """builtin:tiny-judge-arith is trained from tiny-llama-arith, itself trained from tiny-llama: on a
    fresh cache validate reads the tokenizer at the end of that chain (train would build them)."""
    from align.models import tiny

    monkeypatch.setenv("ALIGN_CACHE", str(tmp_path / "cache"))
    assert tiny.resolve("builtin:tiny-judge-arith", for_config=True) == str(tiny.builtin_dir("tiny-llama"))


def test_a_model_dir_under_home_is_read_with_its_tilde(monkeypatch, tmp_path, capsys, recipe_file):
    import shutil

    from align.models import tiny

    shutil.copytree(tiny.resolve("builtin:tiny-llama"), tmp_path / "home" / "tiny")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert main(["validate", recipe_file(model={"name_or_path": "~/tiny"})]) == 0
    assert "data.train: 8 rows, format messages, 8 examples tokenized" in capsys.readouterr().out


# 8. found by feeding the CLI bad input ---------------------------------------------------------
@pytest.mark.parametrize("overrides, key", [
    (["train.adam_betas=[1.5, 0.9]"], "train.adam_betas.0"), (["train.adam_betas=[0.9, .nan]"], "train.adam_betas.1"),
    (["algorithm=grpo", "grpo.epsilon=-0.2"], "grpo.epsilon"), (["algorithm=grpo", "grpo.epsilon=[0.2, 0]"], "grpo.epsilon"),
    (["data.train.path=''"], "data.train.path"), (["data.eval_fraction=0.99"], "data.eval_fraction"),
    (["train.resume_from=no/such/dir"], "train.resume_from"),
])
def test_bad_settings_exit_2_in_validate_naming_the_key(recipe_file, capsys, overrides, key):
    """Each was a traceback (betas out of range, an empty data path, an eval split leaving none of 8
    rows), a silent other run (a negative clip range), or an error only `align train` gave."""
    code, err = cli(capsys, "validate", recipe_file(), *[a for o in overrides for a in ("--set", o)])
    assert code == 2 and key in err, err


def test_a_directory_given_as_the_recipe_is_named_as_one(tmp_path, capsys):
    (tmp_path / "sft.yaml").write_text("algorithm: sft\n")
    for command in ("validate", "train"):
        code, err = cli(capsys, command, str(tmp_path))
        assert code == 2 and f"{tmp_path} is a directory; give a recipe file, e.g. {tmp_path / 'sft.yaml'}" in err, err


def test_an_eval_file_and_an_eval_fraction_together_are_refused(recipe_file, tmp_path, capsys):
    """The fraction was ignored silently where data.eval was given."""
    code, err = cli(capsys, "validate", recipe_file(), "--set", f"data.eval={{path: {tmp_path / 'train.jsonl'}}}",
                    "--set", "data.eval_fraction=0.1")
    assert code == 2 and "data: eval_fraction: 0.1 holds out part of data.train" in err, err
    saved = yaml.safe_load(open(recipe_file()))  # a run saved before: resumes with the fraction dropped
    saved["data"].update(eval={"path": str(tmp_path / "train.jsonl")}, eval_fraction=0.1)
    assert saved_recipe_now(saved, "sft")["data"]["eval_fraction"] == 0.0


def test_a_data_directory_of_empty_files_holds_no_rows(recipe_file, tmp_path, capsys):
    (tmp_path / "shards").mkdir()
    (tmp_path / "shards" / "part-0.jsonl").write_text("")
    code, err = cli(capsys, "validate", recipe_file(data={"train": {"path": str(tmp_path / "shards")}}))
    assert code == 2 and "shards' holds no rows" in err, err


@pytest.mark.parametrize("margin", ["big", True])
def test_a_pair_margin_that_is_not_a_finite_number_names_its_row(tmp_path, capsys, make_recipe, margin):
    rows = preference_rows(6, seed=3)
    rows[4]["margin"] = margin
    recipe = make_recipe(raw=True, rows=rows, algorithm="reward")
    path = tmp_path / "rm.yaml"
    path.write_text(yaml.safe_dump(recipe))
    code, err = cli(capsys, "validate", str(path))
    assert code == 2 and "data.train row 4: margin must be a finite number" in err, err


def test_a_chat_template_path_to_no_file_is_refused():
    """It was taken for a template's text: every prompt rendered as the path (GRPO trained on it)."""
    from align.models.loading import load_tokenizer

    with pytest.raises(AlignError, match="model.chat_template: no file 'templates/chat.jinja'"):
        load_tokenizer(ModelConfig(name_or_path="builtin:tiny-llama", chat_template="templates/chat.jinja"))


def test_output_dir_expands_the_home_directory(make_recipe):
    assert make_recipe(output_dir="~/runs/x").output_dir == os.path.expanduser("~/runs/x")


def test_a_resume_from_that_is_no_checkpoint_leaves_the_new_output_dir_untouched(recipe_file, tmp_path, capsys):
    not_a_checkpoint = tmp_path / "elsewhere"
    not_a_checkpoint.mkdir()
    code, err = cli(capsys, "train", recipe_file(output_dir=str(tmp_path / "new")), "--set",
                    f"train.resume_from={not_a_checkpoint}")
    assert code == 2 and "is not a complete checkpoint directory" in err and "OUTPUT_DIR/checkpoints/step-" in err
    assert not (tmp_path / "new").exists() or not any((tmp_path / "new").iterdir())


@pytest.mark.parametrize("bad, message", [("[1, 2]", "line 2 holds a list, not a JSON object"),
                                          ('{"prompt": "a", "compl', "line 2 is not valid JSON")])
def test_a_jsonl_line_that_is_not_an_object_is_named_by_its_line(recipe_file, tmp_path, capsys, bad, message):
    """datasets named no line (or row 0 for the second)."""
    path = tmp_path / "broken.jsonl"
    path.write_text(json.dumps({"prompt": "a", "completion": "b"}) + "\n" + bad + "\n")
    code, err = cli(capsys, "validate", recipe_file(), "--set", f"data.train.path={path}")
    assert code == 2 and message in err, err


def test_a_message_content_that_is_not_text_names_its_row(recipe_file, tmp_path, capsys):
    """`content: null` got a Jinja message alone ("'dict object' has no attribute 'content'")."""
    rows = chat_rows(4)
    rows[2]["messages"][1]["content"] = None
    path = write_jsonl(tmp_path / "null.jsonl", rows)
    code, err = cli(capsys, "validate", recipe_file(), "--set", f"data.train.path={path}")
    assert code == 2 and "data.train row 2: the chat template failed on a message whose `content` is not a string" \
        in err, err


def test_a_model_path_under_home_is_local(make_recipe):
    recipe = make_recipe(model={"name_or_path": "~/models/x", "tokenizer": "~/tok"})
    assert (recipe.model.name_or_path, recipe.model.tokenizer) == (os.path.expanduser("~/models/x"),
                                                                  os.path.expanduser("~/tok"))


# 9. reward functions checked against the data ----------------------------------------------------
@pytest.mark.parametrize("rewards, rows, eval_rows, message", [
    ([], None, None, "grpo.rewards is empty: add at least one reward"),
    ([{"fn": "exact_answer"}], [{"prompt": "1 + 1 =", "ans": "2"}] * 8, None,
     "data.train: reward function 'exact_answer' (grpo.rewards[0]) requires a parameter 'answer', which is neither "
     "one of prompts, completions, completion_ids nor a dataset column (columns: ans)"),
    ([{"fn": "exact_answer"}], None, [{"prompt": "1 + 1 ="}] * 4, "data.eval: reward function 'exact_answer'"),
    ([{"fn": "format_regex"}], None, None, "requires a parameter 'pattern'"),
    ([{"fn": "rewards/math.py"}], None, None, "Name the function too, e.g. rewards/math.py:my_reward"),
    ([{"fn": "rewards/no_such_file.py"}], None, None, "There is no such file or directory"),
    ([{"fn": "{causal_lm}"}], None, None, "grpo.rewards[0].fn: '{causal_lm}' holds a LlamaForCausalLM, not a reward model"),
    ([{"fn": "{tmp}"}], None, None, "is a directory but not a model (no config.json or adapter_config.json)"),
])
def test_validate_checks_each_reward_against_the_data_before_a_model_loads(make_recipe, tmp_path, capsys, rewards,
                                                                           rows, eval_rows, message):
    """An empty reward list, a reward's required parameter that is no column of a split (or no kwarg),
    and a reward directory that is no reward model exit 2 in validate; they used to fail in `align train`
    after the policy loaded, or (a causal LM as a reward model) score with a random head."""
    from align.models import tiny

    paths = {"{causal_lm}": str(tiny.resolve("builtin:tiny-llama")), "{tmp}": str(tmp_path)}
    rewards = [{"fn": paths.get(r["fn"], r["fn"])} for r in rewards]
    for placeholder, path in paths.items():
        message = message.replace(placeholder, path)
    recipe = tmp_path / "grpo.yaml"
    recipe.write_text(yaml.safe_dump(make_recipe(raw=True, algorithm="grpo", rows=rows or prompt_rows(8),
                                                 eval_rows=eval_rows, grpo={"group_size": 4, "rewards": rewards})))
    code, err = cli(capsys, "validate", str(recipe))
    assert code == 2 and message in err, err
    assert "valid grpo recipe" not in capsys.readouterr().out


def test_validate_passes_a_reward_model_run_not_trained_yet_or_trained_with_lora(make_recipe, tmp_path, capsys):
    from align.models.reward import RewardModel

    recipe = tmp_path / "grpo.yaml"
    recipe.write_text(yaml.safe_dump(make_recipe(raw=True, algorithm="grpo", rows=prompt_rows(8),
                                                 grpo={"group_size": 4, "rewards": [{"fn": str(tmp_path / "rm")}]})))
    assert main(["validate", str(recipe)]) == 0
    assert "not there yet (train it first)" in capsys.readouterr().out
    RewardModel.from_config(ModelConfig(name_or_path="builtin:tiny-llama", dtype="float32"),
                            AdapterConfig(kind="lora", r=4)).save(tmp_path / "rm")
    assert main(["validate", str(recipe)]) == 0
    assert f"reward model {str(tmp_path / 'rm')!r} found" in capsys.readouterr().out


# 10. a checkpoint of another kind of model ------------------------------------------------------------
def test_a_reward_model_given_as_the_policy_is_refused_in_validate_and_in_loading(recipe_file, tmp_path, capsys):
    """A reward model's directory (full, or its LoRA adapter) has no lm-head: transformers loaded it as
    a causal LM with a random one (full) or peft left no trainable weight (adapter)."""
    from align.models.loading import load_model
    from align.models.reward import RewardModel

    for adapter in (AdapterConfig(), AdapterConfig(kind="lora", r=4)):
        rm = tmp_path / f"rm-{adapter.kind}"
        RewardModel.from_config(ModelConfig(name_or_path="builtin:tiny-llama", dtype="float32"), adapter).save(rm)
        code, err = cli(capsys, "validate", recipe_file(), "--set", f"model.name_or_path={rm}")
        assert code == 2 and f"model.name_or_path: '{rm}' holds a reward model" in err, err
        with pytest.raises(AlignError, match="holds a reward model"):
            load_model(ModelConfig(name_or_path=str(rm), dtype="float32"), AdapterConfig())
        load_model(ModelConfig(name_or_path=str(rm), dtype="float32"), AdapterConfig(), head="score")  # its own kind


def test_a_checkpoint_missing_weights_the_model_needs_is_refused(tmp_path):
    """transformers initializes missing weights at random and only prints a report; Align refuses,
    except a new score head (a reward model or critic started from a causal LM)."""
    from align.models.loading import load_model
    from align.models.reward import RewardModel

    rm = tmp_path / "rm"
    RewardModel.from_config(ModelConfig(name_or_path="builtin:tiny-llama", dtype="float32"), AdapterConfig()).save(rm)
    settings = json.loads((rm / "config.json").read_text())
    (rm / "config.json").write_text(json.dumps({**settings, "architectures": ["LlamaForCausalLM"]}))
    with pytest.raises(AlignError, match=r"lacks 1 weight\(s\) a LlamaForCausalLM needs \(lm_head.weight\): they "
                                         "would start random"):
        load_model(ModelConfig(name_or_path=str(rm), dtype="float32"), AdapterConfig())
    load_model(ModelConfig(name_or_path="builtin:tiny-llama", dtype="float32"), AdapterConfig(), head="score")


# 11. settings that contradict each other -------------------------------------------------------------
@pytest.mark.parametrize("algorithm, overrides, message, key", [
    ("ppo", {"critic": "shared", "value_model": "runs/rm"}, "starts a separate critic, but critic is shared", "value_model"),
    ("dpo", {"reference": "frozen_copy", "reference_model": "builtin:tiny-llama"}, "a reference_model is the reference",
     "reference"),
    ("kto", {"reference": "adapter_disabled", "reference_model": "builtin:tiny-llama"},
     "a reference_model is the reference", "reference"),
    ("dpo", {"loss_type": "simpo", "reference_model": "builtin:tiny-llama"}, "loss_type simpo is reference-free",
     "reference_model"),
    ("dpo", {"loss_type": "simpo", "reference": "frozen_copy"}, "loss_type simpo is reference-free", "reference"),
    ("dpo", {"loss_type": "orpo", "precompute_reference": False}, "loss_type orpo is reference-free",
     "precompute_reference"),
    ("grpo", {"reference": "frozen_copy"}, "beta is 0, so there is no KL term", "reference"),
    ("ppo", {"kl_coef": 0.0, "reference": "frozen_copy"}, "kl_coef is 0, so there is no KL penalty", "reference"),
])
def test_a_setting_the_run_would_ignore_is_refused_and_an_earlier_run_with_it_resumes(make_recipe, tmp_path, capsys,
                                                                                      algorithm, overrides, message, key):
    """Each was accepted and one side silently ignored (the value model, the reference strategy, a reference
    model of a reference-free loss); a run saved so by an earlier version reads as the setting it ran."""
    rows = prompt_rows(8) if algorithm in ("ppo", "grpo") else preference_rows(8)
    sections = {algorithm: {"rewards": [{"fn": "exact_answer"}]}} if algorithm in ("ppo", "grpo") else {}
    raw = make_recipe(raw=True, algorithm=algorithm, rows=rows, **sections)
    raw.setdefault(algorithm, {}).update(overrides)
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump(raw))
    code, err = cli(capsys, "validate", str(recipe))
    assert code == 2 and f"  {algorithm}: {key}: " in err and message in err, err
    ran = saved_recipe_now(raw, algorithm)[algorithm]
    assert ran[key] == {"value_model": None, "reference_model": None, "reference": "auto", "kl_in": "loss",
                        "precompute_reference": True}[key], ran


@pytest.mark.parametrize("algorithm, section, overrides, message", [
    ("grpo", "grpo", {"advantage": "grpo", "normalize_advantages": True, "group_size": 4},
     "grpo.normalize_advantages applies to grpo.advantage: rloo only"),
    ("dpo", "data", {"pack_length": 2048}, "data.pack_length sets sft's packed rows"),
    ("dpo", "dpo", {"loss_type": "ipo", "label_smoothing": 0.1}, "label_smoothing applies only to"),
])
def test_a_setting_the_trainer_ignores_or_fails_on_is_refused_by_validate(make_recipe, tmp_path, capsys, algorithm,
                                                                         section, overrides, message):
    """(normalize_advantages and pack_length were ignored; label_smoothing with ipo failed at step 1)"""
    rows = prompt_rows(8) if algorithm == "grpo" else preference_rows(8)
    raw = make_recipe(raw=True, algorithm=algorithm, rows=rows,
                      **({"grpo": {"rewards": [{"fn": "exact_answer"}]}} if algorithm == "grpo" else {}))
    raw.setdefault(section, {}).update(overrides)
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump(raw))
    code, err = cli(capsys, "validate", str(recipe))
    assert code == 2 and message in err, err
    ran = saved_recipe_now(raw, algorithm)
    if section != "dpo":  # an earlier run with the ignored setting resumes as the run it was
        assert ran[section][next(iter(overrides.keys() - {"advantage", "group_size"}))] in (None, False), ran


def test_lora_settings_without_an_adapter_kind_are_refused(recipe_file, capsys):
    """(adapter: {r: 8, target_modules: [...]} with no kind trained the whole model, no word said)"""
    code, err = cli(capsys, "validate", recipe_file(adapter={"r": 8, "target_modules": ["q_proj", "v_proj"]}))
    assert code == 2 and "adapter" in err and "no kind is given" in err and "r, target_modules are set" in err
    assert cli(capsys, "validate", recipe_file(adapter={"kind": "none"}))[0] == 0


@pytest.mark.parametrize("override, named", [
    ("train.learning_rate=1e-4", "TRL's 'learning_rate' is 'train.lr' here"),
    ("train.per_device_train_batch_size=4", "TRL's 'per_device_train_batch_size' is 'train.batch_size' here"),
    ("grpo.num_generations=4", "TRL's 'num_generations' is 'grpo.group_size' here"),
    ("grpo.max_completion_length=64", "'grpo.sampling.max_new_tokens'"),
    ("train.gradient_checkpointing=true", "'model.gradient_checkpointing'"),
    ("train.lrr=1", "did you mean 'train.lr'?"),
])
def test_trl_names_of_settings_are_answered_with_aligns_key(make_recipe, tmp_path, capsys, override, named):
    """(difflib's guesses sent num_generations to num_iterations, another setting; learning_rate got none)"""
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump(make_recipe(raw=True, algorithm="grpo", rows=prompt_rows(8),
                                                 grpo={"rewards": [{"fn": "exact_answer"}]})))
    code, err = cli(capsys, "validate", str(recipe), "--set", override)
    assert code == 2 and named in err, err


def test_a_trl_name_is_answered_only_with_a_key_this_algorithm_has(recipe_file, capsys):
    """(an sft or dpo recipe was sent to 'dpo.sampling.max_prompt_length', which no such recipe has)"""
    code, err = cli(capsys, "validate", recipe_file(), "--set", "data.max_completion_length=64")
    assert code == 2 and "TRL's 'max_completion_length' is 'data.max_length' here" in err
    code, err = cli(capsys, "validate", recipe_file(), "--set", "sft.temperature=0.7")
    assert code == 2 and "sampling" not in err
