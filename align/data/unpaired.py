"""Unpaired preference rows (KTO): a prompt, one completion and a bool `label` (True: desirable).

Rows come as `prompt`/`completion`/`label`, or as preference pairs, each split into two rows (its
chosen completion labelled True, its rejected one False), as TRL's `unpair_preference_dataset`
does. A row is tokenized into `{"prompt_ids", "completion_ids", "label", "row"}` (`row`: the row of
the file it came from, for messages). KTO's reference point needs mismatched pairs: each row's
prompt with another row's completion (`kl_partners`, `kl_completions`), packed beside the rows
(`pack_unpaired`).
"""

from __future__ import annotations

from collections.abc import Sequence

import datasets
import torch

from align.data.groups import pack_groups
from align.data.formats import prompt_completion_ids
from align.data.preference import prompt_problem, split_implicit_prompt
from align.errors import AlignError
from align.ops.logprobs import label_positions

LABEL_COLUMN = "label"


def check_labels(rows: datasets.Dataset, key: str, path: str) -> None:
    """AlignError naming the file unless every row has a bool `label` (0/1 integers are accepted)."""
    if LABEL_COLUMN not in rows.column_names:
        raise AlignError(
            f"{key}: {path!r} has prompt/completion rows but no {LABEL_COLUMN!r} column (its columns are "
            f"{rows.column_names}); kto needs to know which completions are desirable: add "
            f'"{LABEL_COLUMN}": true (desirable) or false (undesirable) to every row, rename your column with '
            f"{key}.columns (e.g. {{is_good: {LABEL_COLUMN}}}), or give preference rows (prompt/chosen/rejected), "
            "whose chosen completions count as desirable and rejected ones as undesirable")
    for row, value in enumerate(rows[LABEL_COLUMN]):
        if not (isinstance(value, bool) or (isinstance(value, int) and value in (0, 1))):
            raise AlignError(f"{key}: {path!r} row {row}: {LABEL_COLUMN!r} must be true or false, got {value!r}; "
                             "fix or remove that row")


def unpair(rows: datasets.Dataset) -> datasets.Dataset:
    """Preference rows -> two unpaired rows each, `prompt`/`completion`/`label`/`row`: the chosen
    completion (label True), then the rejected one (False); an implicit prompt is split off first."""

    def split(batch: dict, indices: list[int]) -> dict:
        out: dict[str, list] = {"prompt": [], "completion": [], LABEL_COLUMN: [], "row": []}
        prompts = batch.get("prompt") or [None] * len(indices)
        for index, prompt, chosen, rejected in zip(indices, prompts, batch["chosen"], batch["rejected"]):
            if prompt is None:
                prompt, chosen, rejected = split_implicit_prompt(chosen, rejected)
            for completion, label in ((chosen, True), (rejected, False)):
                out["prompt"].append(prompt)
                out["completion"].append(completion)
                out[LABEL_COLUMN].append(label)
                out["row"].append(index)
        return out

    return rows.map(split, batched=True, with_indices=True, remove_columns=rows.column_names)


def unpaired_encoder(tokenizer, max_length: int, key: str):
    """Row -> {"prompt_ids", "completion_ids", "label", "row"}, the completion (ending with EOS) cut
    to max_length - len(prompt); or a drop reason when the prompt alone fills max_length."""

    def encode(row: dict, index: int) -> dict:
        source = row.get("row", index)
        if source is None:
            source = index
        prompt_ids, completion_ids = prompt_completion_ids(tokenizer, row["prompt"], row["completion"], source, key)
        empty = {"prompt_ids": [], "completion_ids": [], LABEL_COLUMN: False, "row": source}
        problem = prompt_problem(prompt_ids, max_length)
        if problem:
            return {**empty, "dropped": problem}
        budget = max_length - len(prompt_ids)
        if not completion_ids:
            return {**empty, "dropped": "empty completion (and no EOS token to train on)"}
        return {"prompt_ids": prompt_ids, "completion_ids": completion_ids[:budget],
                LABEL_COLUMN: bool(row[LABEL_COLUMN]), "row": source}

    return encode


def kl_partners(chunks: Sequence[Sequence[int]]) -> dict[int, int]:
    """{row: the row whose completion its mismatched KL pair takes}. Within a chunk (the rows of one
    batch) the completions rotate by one, as in TRL: (x_1, y_n), (x_2, y_1), ..., (x_n, y_{n-1}), so
    the mismatched completions of a batch are its own. A chunk of one row takes the completion of the
    row before it in the concatenated chunks (there is no other in its batch)."""
    flat = [i for chunk in chunks for i in chunk]
    partners, position = {}, 0
    for chunk in chunks:
        if len(chunk) == 1:
            partners[chunk[0]] = flat[position - 1]
        else:
            for j, row in enumerate(chunk):
                partners[row] = chunk[j - 1]
        position += len(chunk)
    return partners


def kl_completions(data, partners: dict[int, int], max_length: int) -> list[list[int]]:
    """Per row of `data` (tokenized), its partner's completion ids cut to fit its own prompt in max_length."""
    prompts, completions = data["prompt_ids"], data["completion_ids"]
    return [completions[partners[i]][:max(max_length - len(prompts[i]), 0)] for i in range(len(data))]


def rotate_within(examples: list[dict], max_length: int | None = None) -> list[list[int]]:
    """The KL completions of a list of examples that carry none: rotated by one within the list."""
    budgets = [None if max_length is None else max(max_length - len(e["prompt_ids"]), 0) for e in examples]
    return [examples[i - 1]["completion_ids"][:budget] for i, budget in enumerate(budgets)]


def pack_unpaired(examples: list[dict], with_kl: bool = True, packed: bool = True) -> dict:
    """Examples -> a batch: the rows [prompt | completion] packed (`pack_groups`, plain layout:
    sequence i is row i), `label` [B] bool, `num_desirable` / `num_undesirable` (host numbers), and
    with_kl the mismatched pairs [prompt_i | kl completion_i] packed the same way under `kl_`
    keys (`kl_input_ids`, `kl_labels`, `kl_position_ids`, `kl_sequence_ids`, `kl_label_positions`)
    from the examples' `kl_ids` (rotated within the batch where they have none). packed=False: a row
    per sequence, with padding masks (`pack_groups`; `kl_attention_mask` too)."""
    batch = pack_groups([(e["prompt_ids"], [e["completion_ids"]]) for e in examples], shared_prompt=False,
                        packed=packed)
    labels = [bool(e[LABEL_COLUMN]) for e in examples]
    batch[LABEL_COLUMN] = torch.tensor(labels, dtype=torch.bool)
    batch["num_desirable"], batch["num_undesirable"] = float(sum(labels)), float(len(labels) - sum(labels))
    if with_kl:
        kl = [e["kl_ids"] for e in examples] if "kl_ids" in examples[0] else rotate_within(examples)
        pairs = pack_groups([(e["prompt_ids"], [ids]) for e, ids in zip(examples, kl)], shared_prompt=False,
                            packed=packed)
        for name in ("input_ids", "labels", "position_ids", "sequence_ids") + (() if packed else ("attention_mask",)):
            batch[f"kl_{name}"] = pairs[name]
        batch["kl_label_positions"] = label_positions(pairs["labels"])
    return batch


def kl_batch(batch: dict) -> dict:
    """The mismatched pairs of a batch made by `pack_unpaired`, as a batch of their own."""
    pairs = {"input_ids": batch["kl_input_ids"], "labels": batch["kl_labels"], "position_ids": batch["kl_position_ids"],
             "sequence_ids": batch["kl_sequence_ids"], "label_positions": batch["kl_label_positions"]}
    if "kl_attention_mask" in batch:  # rows of one sequence each (packed=False)
        pairs["attention_mask"] = batch["kl_attention_mask"]
    return pairs
