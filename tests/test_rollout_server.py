"""Server mode (`align serve-rollouts` + `sampling.engine: server`): rollouts sampled in another
process equal the in-process engine's for the same weights and seeds, through both weight
transports (HTTP and a gloo process group, the CPU stand-in for NCCL), after every sync; a GRPO
run through the server equals one with the in-process engine; stale weights and mistakes are errors.
The vLLM engine behind the server is tested in tests/test_vllm.py; two training processes sharing
one server in tests/test_distributed.py."""

import json
import re

import pytest
import torch

from align.config import ServerConfig, recipe_from_dict
from align.errors import AlignError
from align.models import Policy
from align.rollout import PrefixSharedEngine, SamplingParams
from align.rollout.remote import RemoteEngine
from align.toy import prompt_rows
from align.trainers import GRPOTrainer
from tests.conftest import perturb_trainable, rollout_server

TEXTS = ["12+7=", "3+4=", "100+23=", "9+9="]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """One server for the module: the recipe's model, sampled by prefix_shared."""
    root = tmp_path_factory.mktemp("server")
    with rollout_server(_recipe(root, "served", "none"), root / "serve.yaml", "--engine", "prefix_shared") as url:
        yield url


def _recipe(root, name: str, adapter: str, **grpo) -> dict:
    from tests.conftest import write_jsonl

    return {"algorithm": "grpo", "output_dir": str(root / name),
            "model": {"name_or_path": "builtin:tiny-llama", "dtype": "float32"},
            "adapter": {"kind": adapter, "r": 8, "alpha": 16, "dropout": 0.0},
            "data": {"train": {"path": write_jsonl(root / "prompts.jsonl", prompt_rows(8, seed=21))},
                     "max_length": 64},
            "train": {"lr": 1e-2, "batch_size": 8, "max_steps": 3, "schedule": "constant", "log_every": 1,
                      "progress": False, "plots": False, "seed": 0},
            "grpo": {"group_size": 4, "num_iterations": 1, "beta": 0.05, "loss_norm": "dapo",
                     "sampling": {"max_new_tokens": 10, "engine": "prefix_shared"},
                     "rewards": [{"fn": "tests.test_rollout_server:digits"}], **grpo}}


def digits(completions, **_):
    """A reward that varies between random completions."""
    return [float(sum(c.isdigit() for c in text)) for text in completions]


def _policy(kind: str) -> Policy:
    from align.config import AdapterConfig, ModelConfig

    policy = Policy.from_config(ModelConfig(name_or_path="builtin:tiny-llama", dtype="float32"),
                                AdapterConfig(kind=kind, r=8, dropout=0.0))
    _perturb(policy, seed=0)
    return policy


def _perturb(policy: Policy, seed: int) -> None:
    perturb_trainable(policy.model, seed, lora_b=0.3, other=0.05)


@pytest.mark.parametrize("kind,transport", [("none", "http"), ("lora", "collective"), ("none", "collective")])
def test_the_server_samples_what_the_in_process_engine_samples_after_every_sync(server, kind, transport):
    policy = _policy(kind)
    prompts = [policy.tokenizer(t)["input_ids"] for t in TEXTS]
    ours = PrefixSharedEngine(policy.model, policy.tokenizer)
    remote = RemoteEngine(policy.model, policy.tokenizer, ServerConfig(url=server, transport=transport, timeout_s=60))
    for seed in (0, 1):
        params = SamplingParams(temperature=1.0, top_k=20, max_new_tokens=12, seed=seed)
        assert remote.generate(prompts, params, 3) == ours.generate(prompts, params, 3)
    greedy = SamplingParams(temperature=0, max_new_tokens=12)
    before = remote.generate(prompts, greedy, 1)
    _perturb(policy, seed=1)
    assert remote.generate(prompts, greedy, 1) == before, "the server keeps its weights until the next sync"
    assert before != ours.generate(prompts, greedy, 1), "the change must show in the greedy tokens"
    remote.sync_weights()
    assert remote.generate(prompts, greedy, 2) == ours.generate(prompts, greedy, 2)


def test_grpo_through_the_server_equals_grpo_with_the_in_process_engine(server, tmp_path):
    """LoRA GRPO with a KL reference, 3 steps (a weight sync before each): the same rollouts, so the
    same losses, KL, rewards and final adapter."""
    runs = {}
    for engine in ("prefix_shared", "server"):
        recipe = _recipe(tmp_path, engine, "lora")
        recipe["grpo"]["sampling"].update(engine=engine, server={"url": server, "transport": "collective"})
        trainer = GRPOTrainer.from_recipe(recipe_from_dict(recipe))
        trainer.fit()
        history = [json.loads(line) for line in open(f"{recipe['output_dir']}/metrics.jsonl")]
        runs[engine] = (history, {n: p.detach().clone() for n, p in trainer.policy.model.named_parameters()
                                          if p.requires_grad})
    (local, local_weights), (remote, remote_weights) = runs["prefix_shared"], runs["server"]
    assert len(local) == len(remote) == 3
    assert any(r["reward_std"] > 0 for r in local)  # the rewards vary: a real gradient
    for a, b in zip(local, remote):
        for key in ("loss", "kl", "reward", "grad_norm"):
            assert a[key] == pytest.approx(b[key], rel=1e-6, abs=1e-7), key
    for name, tensor in local_weights.items():
        torch.testing.assert_close(remote_weights[name], tensor, atol=1e-7, rtol=0, msg=name)


def test_a_rollout_from_weights_another_trainer_sent_is_an_error(server):
    first, second = _policy("none"), _policy("none")
    prompts = [first.tokenizer(TEXTS[0])["input_ids"]]
    engine = RemoteEngine(first.model, first.tokenizer, ServerConfig(url=server, transport="http"))
    RemoteEngine(second.model, second.tokenizer, ServerConfig(url=server, transport="http"))
    with pytest.raises(AlignError, match="another run using the same server"):
        engine.generate(prompts, SamplingParams(max_new_tokens=4), 1)


def test_clear_errors(server, tmp_path):
    policy = _policy("none")
    with pytest.raises(AlignError, match="no rollout server answers.*serve-rollouts"):
        RemoteEngine(policy.model, policy.tokenizer, ServerConfig(url="http://127.0.0.1:9", timeout_s=5))
    from align.config import AdapterConfig, ModelConfig

    other = Policy.from_config(ModelConfig(name_or_path="builtin:small-llama", dtype="float32"), AdapterConfig())
    for transport in ("http", "collective"):  # a model that is not the served one: refused before anything loads
        with pytest.raises(AlignError, match="refused.*(not in the served model|has shape)"):
            RemoteEngine(other.model, other.tokenizer, ServerConfig(url=server, transport=transport, timeout_s=30))
    engine = RemoteEngine(policy.model, policy.tokenizer, ServerConfig(url=server, transport="http"))
    with pytest.raises(AlignError, match="unknown sampling params"):
        engine.request("POST", "/generate", {"prompt_ids": [[1, 2]], "params": {"temprature": 1.0}})
    with pytest.raises(ValueError, match="http://"):
        ServerConfig(url="gpu-node:8000")
    recipe = _recipe(tmp_path, "sft", "none")
    recipe.update(algorithm="sft")
    del recipe["grpo"]
    from align.rollout.server import serve

    with pytest.raises(AlignError, match="samples nothing"):
        serve(recipe_from_dict(recipe))


def test_validate_asks_the_server(server, tmp_path, capsys):
    import yaml

    from align.cli import main

    recipe = _recipe(tmp_path, "run", "lora")
    path = tmp_path / "recipe.yaml"
    for url, code, said in [(server, 0, "rollout server .*: PrefixSharedEngine, \\d+ weights in float32"),
                            ("http://127.0.0.1:9", 2, "no rollout server answers")]:
        recipe["grpo"]["sampling"].update(engine="server", server={"url": url})
        path.write_text(yaml.safe_dump(recipe))
        assert main(["validate", str(path)]) == code
        out = capsys.readouterr()
        assert re.search(said, out.out + out.err)


def test_tied_weights_must_come_with_equal_values():
    """A served model whose embeddings are tied holds one tensor under two names: a trainer that
    trains one of them (modules_to_save: [lm_head]) would have the other silently overwritten."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from align.rollout.server import ServedModel, copy_into

    model = LlamaForCausalLM(LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                         num_attention_heads=2, num_key_value_heads=1, tie_word_embeddings=True))
    served = ServedModel(None, model, torch.float32, lambda weights: copy_into(model, weights))
    assert served.tied == [["model.embed_tokens.weight", "lm_head.weight"]]
    weights = {name: p.detach() + 1 for name, p in model.named_parameters(remove_duplicate=False)}
    assert served.load(weights) == 1
    torch.testing.assert_close(model.lm_head.weight, weights["lm_head.weight"])
    weights["lm_head.weight"] = weights["lm_head.weight"] + 1
    with pytest.raises(ValueError, match="tied embeddings.*modules_to_save"):
        served.load(weights)
