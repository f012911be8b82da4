"""Bad input fails before any model loads, with exit code 2, no traceback, and a message that
names the file, key or row and says how to fix it."""

import os

import pytest
import yaml

from align.cli import main
from align.toy import chat_rows, prompt_completion_rows
from tests.conftest import write_jsonl


def run_cli(tmp_path, capsys, recipe: dict, *extra):
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    code = main(["train", str(path), *extra])
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return code, err


def test_unknown_key_names_file_key_and_closest_valid_key(make_recipe, tmp_path, capsys):
    recipe = make_recipe(raw=True)
    recipe["train"]["lrr"] = 1e-4
    code, err = run_cli(tmp_path, capsys, recipe)
    assert code == 2
    assert "recipe.yaml" in err and "train.lrr: unknown key; did you mean 'train.lr'?" in err


def test_unknown_top_level_key_and_override_typo(make_recipe, tmp_path, capsys):
    code, err = run_cli(tmp_path, capsys, make_recipe(raw=True), "--set", "adaptor.kind=lora")
    assert code == 2 and "adaptor: unknown key; did you mean 'adapter'?" in err


def test_wrong_type_is_named(make_recipe, tmp_path, capsys):
    code, err = run_cli(tmp_path, capsys, make_recipe(raw=True), "--set", "train.batch_size=many")
    assert code == 2 and "train.batch_size" in err and "'many'" in err


def test_missing_dataset_file(make_recipe, tmp_path, capsys):
    code, err = run_cli(tmp_path, capsys, make_recipe(raw=True), "--set", "data.train.path=nowhere/train.jsonl")
    assert code == 2 and "data.train.path: file not found: 'nowhere/train.jsonl'" in err


def test_missing_columns_lists_what_was_found(make_recipe, tmp_path, capsys):
    recipe = make_recipe(raw=True, data={"train": {"path": write_jsonl(tmp_path / "odd.jsonl", [{"question": "q"}])}})
    code, err = run_cli(tmp_path, capsys, recipe)
    assert code == 2 and "data.train: cannot tell the data format from columns ['question']" in err
    code, err = run_cli(tmp_path, capsys, recipe, "--set", "data.format=messages")
    assert code == 2 and "format 'messages' needs columns ['messages'], found ['question']" in err


def test_tokenizer_without_chat_template_on_messages_data(make_recipe, tmp_path, capsys):
    from transformers import AutoTokenizer

    from align.models.tiny import resolve

    tokenizer = AutoTokenizer.from_pretrained(resolve("builtin:tiny-llama"))
    tokenizer.chat_template = None
    tokenizer.save_pretrained(tmp_path / "no-template")
    code, err = run_cli(tmp_path, capsys, make_recipe(raw=True, model={"tokenizer": str(tmp_path / "no-template")}))
    assert code == 2 and "the tokenizer has no chat template; set model.chat_template" in err


def test_a_tokenizer_of_another_vocabulary_than_the_model_s_own_is_refused(make_recipe, tmp_path, capsys):
    """One with no more tokens than the model's embeddings loads and trains, reading every text as other
    tokens than the model learnt; one that only adds tokens (or is the model's own) is fine."""
    from align.models.tiny import build_tokenizer, resolve

    other = build_tokenizer(["Answers are numbers: 12 + 30 = 42, and 7 * 6 = 42 too."] * 8, 300)
    other.save_pretrained(tmp_path / "other")
    recipe = make_recipe(raw=True, model={"name_or_path": "builtin:tiny-llama", "tokenizer": str(tmp_path / "other")})
    for command in (["validate"], ["train"]):
        path = tmp_path / "recipe.yaml"
        path.write_text(yaml.safe_dump(recipe))
        assert main([*command, str(path)]) == 2
        err = capsys.readouterr().err
        assert f"model.tokenizer: '{tmp_path / 'other'}' is not the vocabulary of the model's own tokenizer " \
               "('builtin:tiny-llama')" in err and "Give the model's own tokenizer" in err, err
    from transformers import AutoTokenizer

    extended = AutoTokenizer.from_pretrained(resolve("builtin:tiny-llama"))
    extended.add_special_tokens({"additional_special_tokens": ["<|tool|>"]})
    extended.save_pretrained(tmp_path / "extended")
    recipe["model"]["tokenizer"] = str(tmp_path / "extended")
    path.write_text(yaml.safe_dump(recipe))
    main(["validate", str(path)])
    assert "is not the vocabulary" not in capsys.readouterr().err
    # a model whose own tokenizer does not load (a format this `tokenizers` cannot read): the reason to
    # give model.tokenizer; nothing to compare with
    import json
    import shutil

    from align.config import ModelConfig
    from align.models.loading import load_tokenizer

    unreadable = tmp_path / "unreadable"
    shutil.copytree(resolve("builtin:tiny-llama"), unreadable)
    spec = json.loads((unreadable / "tokenizer.json").read_text())
    spec["model"]["type"] = "BPE2"
    (unreadable / "tokenizer.json").write_text(json.dumps(spec))
    given = load_tokenizer(ModelConfig(name_or_path=str(unreadable), tokenizer=resolve("builtin:tiny-llama")))
    assert len(given) == len(extended) - 1  # (loaded: the tiny-llama tokenizer, without the added token)


def test_max_length_smaller_than_every_prompt(make_recipe, tmp_path, capsys):
    rows = prompt_completion_rows(4)
    code, err = run_cli(tmp_path, capsys, make_recipe(raw=True, rows=rows), "--set", "data.max_length=4")
    assert code == 2
    assert "every row was dropped" in err and "max_length=4" in err and "raise data.max_length" in err


def test_validate_reports_rows_and_format(make_recipe, tmp_path, capsys):
    path = tmp_path / "ok.yaml"
    path.write_text(yaml.safe_dump(make_recipe(raw=True, rows=chat_rows(5))))
    assert main(["validate", str(path)]) == 0
    assert "data.train: 5 rows, format messages" in capsys.readouterr().out


def test_recipe_file_missing(capsys):
    assert main(["train", "no/such/recipe.yaml"]) == 2
    assert "recipe file not found: no/such/recipe.yaml" in capsys.readouterr().err


def test_export_onto_an_existing_file_or_non_empty_dir_exits_2_and_writes_nothing(tmp_path, capsys):
    run = tmp_path / "run"
    run.mkdir()
    (run / "adapter_config.json").write_text("{}")
    (tmp_path / "afile").write_text("keep me")
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "notes.txt").write_text("keep me")
    for out, problem in (("afile", "is a file"), ("full", "not empty")):
        assert main(["export", str(run), str(tmp_path / out)]) == 2
        assert problem in capsys.readouterr().err
    assert (tmp_path / "afile").read_text() == "keep me" and os.listdir(tmp_path / "full") == ["notes.txt"]
