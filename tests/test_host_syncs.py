"""The training step never waits on the host: no `.item()`, `.tolist()`, `.cpu()`, boolean-mask
indexing or `nonzero` in one optimizer step of SFT, DPO, GRPO and PPO; the metrics are read once,
when a record is logged. Counted on the CPU by `tests.host_reads.HostReads` (the operations that
would make a GPU wait), scoped to `Trainer.train_step` on already-collated (host) batches.

Reads inside transformers' own forward are counted apart; there are none either: packed rows get
their block-diagonal mask built on the device (`align.models.packed.packed_rows_mask`) instead of
transformers asking the device whether the rows restart their positions.
"""

import pytest
import torch

import align.ops.logprobs as logprobs_ops
from align.toy import chat_rows, preference_rows, prompt_rows
from align.trainers import DPOTrainer, GRPOTrainer, PPOTrainer, SFTTrainer
from tests.host_reads import HostReads

pytestmark = pytest.mark.usefixtures("arith_builtin")  # builtin:tiny-llama-arith, trained once

ARITH = {"model": {"name_or_path": "builtin:tiny-llama-arith", "dtype": "float32"},
         "adapter": {"kind": "lora", "r": 8, "alpha": 16, "dropout": 0.0}, "data": {"max_length": 64}}
LORA = {"adapter": {"kind": "lora", "r": 8, "alpha": 16, "dropout": 0.0}}


def step_reads(trainer, step: int = 0, logged: bool = False) -> HostReads:
    """Host reads of optimizer step `step` (collated outside the count), and of its log if `logged`."""
    batches = trainer.micro_batches(step)
    host = [v for b in batches for v in b.values() if isinstance(v, torch.Tensor)]
    trainer.output_dir.mkdir(parents=True, exist_ok=True)
    for cb in trainer.callbacks:
        cb.on_train_begin(trainer)
    with HostReads(host) as reads:
        record = trainer.train_step(batches)
        trainer.step += 1
        if logged:
            trainer.log(record)
    if logged:
        assert all(isinstance(v, float) for v in record.values()), record
    return reads


def counts(trainer_cls, recipe, **kwargs) -> tuple[int, int, int]:
    """(Align's reads on a non-log step, on a log step, transformers' reads on the non-log step)."""
    trainer = trainer_cls.from_recipe(recipe)
    quiet = step_reads(trainer, 0)
    logged = step_reads(trainer, 1, logged=True)
    return quiet.count, logged.count, quiet.in_transformers


CASES = {
    "sft": (SFTTrainer, lambda n: dict(rows=chat_rows(32, seed=5), train={"batch_size": n})),
    "sft-accumulated": (SFTTrainer, lambda n: dict(rows=chat_rows(32, seed=5), train={"batch_size": n // 2,
                                                                                       "grad_accum": 2})),
    "dpo": (DPOTrainer, lambda n: dict(algorithm="dpo", rows=preference_rows(32, seed=11), **LORA,
                                       train={"batch_size": n})),
    "dpo-live-reference": (DPOTrainer, lambda n: dict(algorithm="dpo", rows=preference_rows(32, seed=11), **LORA,
                                                      dpo={"precompute_reference": False}, train={"batch_size": n})),
    "grpo-fused": (GRPOTrainer, lambda n: dict(algorithm="grpo", rows=prompt_rows(16, seed=21), **ARITH,
                                               train={"batch_size": 2 * n},
                                               grpo={"group_size": 4, "sampling": {"max_new_tokens": 8},
                                                     "rewards": [{"fn": "exact_answer"}]})),
    "grpo-reused-kl": (GRPOTrainer, lambda n: dict(algorithm="grpo", rows=prompt_rows(16, seed=21), **ARITH,
                                                   train={"batch_size": 2 * n},
                                                   grpo={"group_size": 4, "num_iterations": 2, "beta": 0.1,
                                                         "sampling": {"max_new_tokens": 8},
                                                         "rewards": [{"fn": "exact_answer"}]})),
    "ppo": (PPOTrainer, lambda n: dict(algorithm="ppo", rows=prompt_rows(32, seed=31), **ARITH,
                                       train={"batch_size": n},
                                       ppo={"sampling": {"max_new_tokens": 8}, "rewards": [{"fn": "exact_answer"}],
                                            "kl_coef": 0.02, "ppo_epochs": 2})),
}


@pytest.mark.parametrize("name", list(CASES))
def test_a_step_reads_the_host_only_when_it_logs(name, make_recipe, monkeypatch):
    """Zero reads on a non-log step and one (the stacked record's `tolist`) on a log step, whatever
    the batch size and the log-prob chunk size (2 tokens a chunk: many chunks)."""
    trainer_cls, sections = CASES[name]
    seen = set()
    for batch_size, chunk_size in ((2, 1024), (4, 2)):
        monkeypatch.setattr(logprobs_ops, "CHUNK_SIZE", chunk_size)
        recipe = make_recipe(**{**sections(batch_size), "train": {**sections(batch_size)["train"], "log_every": 1000,
                                                                   "max_steps": 4}})
        quiet, logged, in_transformers = counts(trainer_cls, recipe)
        assert quiet == 0, (name, batch_size, chunk_size)
        assert logged == 1, (name, batch_size, chunk_size)
        assert in_transformers == 0, (name, batch_size, chunk_size)
        seen.add((quiet, logged))
    assert len(seen) == 1


def test_the_counter_sees_every_kind_of_host_read():
    device = torch.randn(6)
    host = torch.arange(6)
    with HostReads([host]) as reads:
        device.sum().item()
        float(device[0])
        bool(device[0] > 0)
        device.tolist()
        device.cpu()
        device.numpy()
        device[device > 0]
        device.nonzero()
        device.masked_select(device > 0)
        device.to("cpu").sum()  # on a CPU machine a copy to the host looks like a move to the device: not counted
        int(host.sum())  # host tensors are free
        host.to(device.device)[0].item()  # ...until moved
    assert reads.by_kind == {"item": 4, "tolist": 1, "cpu": 1, "numpy": 1, "bool index": 1, "nonzero": 1,
                             "masked_select": 1}, reads.by_kind
