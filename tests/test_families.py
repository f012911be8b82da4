"""The model-family matrix: Align's log-probs equal each family's own forward().

Tiny random configs (2 layers, built offline) of the families people fine-tune. Each sets its
family's special knob (logit soft-cap, logit scale, sliding window smaller than the test
sequences, lm-head bias) to a value that changes the logits, and `test_knob_changes_the_logits`
checks that it does, so a default config cannot hide a bug. Then, under every attention
implementation the model supports here: packed rows, shared-prompt groups (a DPO pair, a GRPO
group) and the sampler's logits against `log_softmax(model(...).logits / T)`, in fp32 and under
bf16 autocast; full, LoRA and QLoRA wraps; and every trainer runs two steps on each family. The MoE families' LoRA covers their experts too.
"""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
import transformers as T

from align.config import AdapterConfig, ModelConfig
from align.data.groups import pack_groups
from align.errors import AlignError
from align.models import Policy
from align.models.loading import load_model, load_tokenizer
from align.models.packed import layer_windows, shared_prompt_masks
from align.models.policy import TokenLogprobModel
from align.models.tiny import resolve
from align.ops.logprobs import IGNORE_INDEX
from align.rollout.prefix_shared import PrefixSharedEngine
from align.rollout.sampling import inference
from align.rollout.static_decoder import StaticDecoder, static_decoding_refusal
from tests.conftest import write_jsonl

VOCAB = 512  # the built-in tiny tokenizer's, so trainers can run on these models
TEMPERATURE = 0.7  # != 1, so temperature must divide the post-processed logits (lm-head bias included)
WINDOW = 4  # sliding window, much shorter than the test sequences


@dataclasses.dataclass
class Family:
    config: type
    model: type
    settings: dict
    knobs: dict = dataclasses.field(default_factory=dict)
    """knob name -> config settings that turn it off (the logits must then change)."""


FAMILIES = {
    "llama": Family(T.LlamaConfig, T.LlamaForCausalLM, {}),
    "llama-tied": Family(T.LlamaConfig, T.LlamaForCausalLM, {"tie_word_embeddings": True},
                         {"tied embeddings": {"tie_word_embeddings": False}}),
    "qwen2": Family(T.Qwen2Config, T.Qwen2ForCausalLM,
                    {"use_sliding_window": True, "sliding_window": WINDOW, "max_window_layers": 1},
                    {"sliding window": {"use_sliding_window": False}}),
    "qwen3": Family(T.Qwen3Config, T.Qwen3ForCausalLM,
                    {"use_sliding_window": True, "sliding_window": WINDOW, "max_window_layers": 1, "head_dim": 8},
                    {"sliding window": {"use_sliding_window": False}}),
    "mistral": Family(T.MistralConfig, T.MistralForCausalLM, {"sliding_window": WINDOW},
                      {"sliding window": {"sliding_window": None}}),
    "gemma2": Family(T.Gemma2Config, T.Gemma2ForCausalLM,
                     {"sliding_window": WINDOW, "final_logit_softcapping": 1.5, "head_dim": 8,
                      "query_pre_attn_scalar": 8},
                     {"softcap": {"final_logit_softcapping": None}, "sliding window": {"sliding_window": 512}}),
    "gemma3": Family(T.Gemma3TextConfig, T.Gemma3ForCausalLM,
                     {"sliding_window": WINDOW, "final_logit_softcapping": 1.5, "head_dim": 8,
                      "query_pre_attn_scalar": 8, "layer_types": ["sliding_attention", "full_attention"]},
                     {"softcap": {"final_logit_softcapping": None}, "sliding window": {"sliding_window": 512}}),
    "phi3": Family(T.Phi3Config, T.Phi3ForCausalLM, {"sliding_window": WINDOW},
                   {"sliding window": {"sliding_window": None}}),
    "cohere": Family(T.CohereConfig, T.CohereForCausalLM, {"logit_scale": 0.5},
                     {"logit scale": {"logit_scale": 1.0}}),
    "granite": Family(T.GraniteConfig, T.GraniteForCausalLM, {"logits_scaling": 3.0},
                      {"logits scaling": {"logits_scaling": 1.0}}),
    "olmo2": Family(T.Olmo2Config, T.Olmo2ForCausalLM, {}),
    # MoE: peft adapts the experts (3-D parameters in transformers 5) as parameters
    "mixtral": Family(T.MixtralConfig, T.MixtralForCausalLM,
                      {"num_local_experts": 4, "num_experts_per_tok": 2, "sliding_window": WINDOW},
                      {"sliding window": {"sliding_window": None}}),
    "qwen3_moe": Family(T.Qwen3MoeConfig, T.Qwen3MoeForCausalLM,
                        {"num_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 32, "head_dim": 8}),
    "phi-lm-head-bias": Family(T.PhiConfig, T.PhiForCausalLM, {}, {"lm-head bias": {}}),
}


def build(name: str, attn: str = "sdpa", **overrides) -> torch.nn.Module:
    """The family's tiny model (fixed seed), fp32, eval mode; raises ValueError when transformers
    does not support `attn` for it."""
    family = FAMILIES[name]
    config = family.config(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                           initializer_range=0.2, pad_token_id=0, bos_token_id=None, eos_token_id=1,
                           **{**family.settings, **overrides})
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = family.model._from_config(config, attn_implementation=attn)
        head = model.get_output_embeddings()
        if head.bias is not None:  # transformers initialises biases to 0, which would hide a bias bug
            torch.nn.init.normal_(head.bias, std=1.0)
    return model.eval()


def supported(name: str) -> list[str]:
    """The attention implementations transformers runs this family with here."""
    out = []
    for attn in ("sdpa", "eager"):
        try:
            build(name, attn)
            out.append(attn)
        except ValueError:
            pass
    return out


MATRIX = [(name, attn) for name in FAMILIES for attn in supported(name)]


def forward_logprobs(model, sequence: list[int], start: int) -> torch.Tensor:
    """log p(sequence[t] | sequence[:t]) for t >= start, from the model's own forward()."""
    ids = torch.tensor([sequence])
    logits = model(input_ids=ids, use_cache=False).logits[0, start - 1:-1].float()
    return torch.log_softmax(logits / TEMPERATURE, -1).gather(-1, ids[0, start:, None])[:, 0]


def random_ids(*lengths: int, seed: int = 0) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(2, VOCAB, (n,), generator=g).tolist() for n in lengths]


def groups():
    """A DPO pair and a GRPO group, prompts longer than the window: (prompt, completions)."""
    p1, c1, c2, p2, *group = random_ids(11, 5, 7, 9, 3, 6, 4, seed=1)
    return [(p1, [c1, c2]), (p2, group)]


def check_groups_against_forward(model, logprobs_of, tolerance: float) -> None:
    """`logprobs_of(batch)` on both layouts of `groups()` equals forward() per sequence."""
    for shared in (True, False):
        batch = pack_groups(groups(), shared_prompt=shared)
        inputs = {k: batch[k] for k in ("input_ids", "labels", "position_ids", "attention_mask")}
        with torch.no_grad():
            ours = logprobs_of(inputs)
        sequence = 0
        for prompt, completions in groups():
            for completion in completions:
                want = forward_logprobs(model, prompt + completion, len(prompt))
                got = ours[batch["sequence_ids"] == sequence]
                torch.testing.assert_close(got, want, atol=tolerance, rtol=0,
                                           msg=lambda m: f"shared_prompt={shared}, sequence {sequence}: {m}")
                sequence += 1


@pytest.mark.parametrize("name", FAMILIES)
def test_knob_changes_the_logits(name):
    model = build(name, supported(name)[0])
    ids = torch.tensor(random_ids(16))
    with torch.no_grad():
        logits = model(input_ids=ids).logits
        for knob, off in FAMILIES[name].knobs.items():
            plain = build(name, supported(name)[0], **off)
            if knob == "lm-head bias":
                torch.nn.init.zeros_(plain.get_output_embeddings().bias)
            assert (plain(input_ids=ids).logits - logits).abs().max() > 1e-2, f"{name}: {knob} changes nothing"


@pytest.mark.parametrize("name, attn", MATRIX)
def test_logprobs_on_packed_rows_and_shared_prompts_equal_forward(name, attn):
    model = build(name, attn)
    check_groups_against_forward(model, lambda b: TokenLogprobModel(model)(**b, temperature=TEMPERATURE), 1e-5)
    # packed rows: two sequences in one row, position ids restarting, no mask
    first, second = random_ids(13, 9, seed=2)
    labels = first[1:] + [IGNORE_INDEX] + second[1:] + [IGNORE_INDEX]
    batch = {"input_ids": torch.tensor([first + second]), "labels": torch.tensor([labels]),
             "position_ids": torch.tensor([list(range(13)) + list(range(9))])}
    with torch.no_grad():
        ours = TokenLogprobModel(model)(**batch, temperature=TEMPERATURE)[0]
    torch.testing.assert_close(ours[:12], forward_logprobs(model, first, 1), atol=1e-5, rtol=0)
    torch.testing.assert_close(ours[13:21], forward_logprobs(model, second, 1), atol=1e-5, rtol=0)


@pytest.mark.parametrize("name", FAMILIES)
def test_logprobs_under_bf16_autocast_match_the_models_bf16_forward(name):
    model = build(name, supported(name)[-1])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        check_groups_against_forward(model, lambda b: TokenLogprobModel(model)(**b, temperature=TEMPERATURE), 5e-2)


@pytest.mark.parametrize("name, attn", MATRIX)
def test_sampler_logits_equal_forward(name, attn):
    """The prefix-shared sampler's next-token logits (left-padded prompts, a shared KV cache, decode
    steps past the window) equal forward() on the whole sequence."""
    model = build(name, attn)
    engine = PrefixSharedEngine(model, tokenizer=None)
    prompts = random_ids(9, 5, seed=3)
    steps = random_ids(*[4] * 6, seed=4)  # 6 steps of 4 tokens: one per live row (2 prompts x G=2)
    with inference(model):
        live, logits = engine.prefill(prompts, 2, len(steps), torch.device("cpu"))
        for step in range(len(steps) + 1):
            for row in range(4):
                sequence = prompts[row // 2] + [s[row] for s in steps[:step]]
                want = model(input_ids=torch.tensor([sequence])).logits[0, -1]
                torch.testing.assert_close(torch.log_softmax(logits[row].float(), -1),
                                           torch.log_softmax(want.float(), -1), atol=1e-5, rtol=0)
            if step < len(steps):
                live.push(torch.tensor(steps[step]))
                logits = engine.decode(live)


@pytest.mark.parametrize("name, attn", MATRIX)
def test_static_decoder_logits_equal_forward(name, attn):
    """The static decoder (what CUDA graphs replay; run eagerly here) gives forward()'s logits on
    each family with its sliding window turned off, a finished row riding along; a model with
    sliding-window layers is refused (it decodes the usual way)."""
    model = build(name, attn, **FAMILIES[name].knobs.get("sliding window", {}))
    engine = PrefixSharedEngine(model, tokenizer=None)
    prompts = random_ids(9, 5, seed=3)
    steps = random_ids(*[4] * 6, seed=4)
    with inference(model):
        live, logits = engine.prefill(prompts, 2, len(steps), torch.device("cpu"))
        refusal = static_decoding_refusal(model, live.cache)
        if any(window is not None for window in layer_windows(model.config).values()):
            assert refusal is not None and "sliding-window" in refusal
            assert "sliding-window" in static_decoding_refusal(build(name, attn), live.cache)
            return
        assert refusal is None
        decoder = StaticDecoder(model, live.cache, live.mask[:, :live.width], live.positions, len(steps),
                                graphs=False)
        rows = [0, 1, 2, 3]
        for step in range(len(steps) + 1):
            for i, row in enumerate(rows):
                sequence = prompts[row // 2] + [s[row] for s in steps[:step]]
                want = model(input_ids=torch.tensor([sequence])).logits[0, -1]
                torch.testing.assert_close(torch.log_softmax(logits[i].float(), -1),
                                           torch.log_softmax(want.float(), -1), atol=1e-5, rtol=0)
            if step < len(steps):
                rows = [0, 2, 3] if step >= 2 else rows  # row 1 finished after its third token
                logits = decoder.step(torch.tensor(rows), torch.tensor([steps[step][r] for r in rows]))
    assert decoder.graph is None and decoder.updates == model.config.num_hidden_layers * len(steps)


@pytest.fixture(scope="module")
def family_dir(tmp_path_factory):
    """family name -> a saved model directory with the built-in tiny tokenizer (sdpa, else eager)."""
    return saved_models(tmp_path_factory, lambda name: build(name, supported(name)[0]))


def saved_models(tmp_path_factory, build_model):
    """name -> a directory holding build_model(name) (built once) and the built-in tiny tokenizer."""
    made = {}

    def make(name: str) -> str:
        if name not in made:
            path = tmp_path_factory.mktemp(name)
            model = build_model(name)
            model.config.eos_token_id = load_tokenizer(ModelConfig(name_or_path="builtin:tiny-llama")).eos_token_id
            model.save_pretrained(path)
            T.AutoTokenizer.from_pretrained(resolve("builtin:tiny-llama")).save_pretrained(path)
            made[name] = str(path)
        return made[name]

    return make


@pytest.mark.parametrize("kind", ["none", "lora", "qlora"])
@pytest.mark.parametrize("name", FAMILIES)
def test_full_lora_and_qlora_policies_equal_the_wrapped_models_forward(name, kind, family_dir):
    attn = supported(name)[0]
    config = ModelConfig(name_or_path=family_dir(name), dtype="float32", attn_implementation=attn)
    adapter = AdapterConfig(kind=kind, r=4, dropout=0.0)
    policy = Policy(load_model(config, adapter), load_tokenizer(config))  # its probe runs here
    model = policy.model.eval()
    if kind != "none":  # a trained-looking adapter: LoRA B is zero at init
        with torch.no_grad():
            for param_name, param in model.named_parameters():
                if "lora_B" in param_name:
                    param.normal_(std=0.1)
    check_groups_against_forward(model, lambda b: policy.logprobs(b, temperature=TEMPERATURE), 1e-5)


def trainer_recipes(model_dir: str, attn: str, tmp_path) -> dict[str, dict]:
    from align.toy import chat_rows, preference_rows, prompt_rows

    rows = {"sft": chat_rows(8, seed=1), "reward": preference_rows(8, seed=2), "dpo": preference_rows(8, seed=3),
            "grpo": prompt_rows(4, seed=4), "ppo": prompt_rows(4, seed=5)}
    sampling = {"max_new_tokens": 8}
    sections = {"grpo": {"group_size": 2, "sampling": sampling, "rewards": [{"fn": "exact_answer"}]},
                "ppo": {"sampling": sampling, "rewards": [{"fn": "exact_answer"}], "ppo_epochs": 1}}
    return {algorithm: {"algorithm": algorithm, "output_dir": str(tmp_path / algorithm),
                        "model": {"name_or_path": model_dir, "dtype": "float32", "attn_implementation": attn},
                        "adapter": {"kind": "lora", "r": 4},
                        "data": {"train": {"path": write_jsonl(tmp_path / f"{algorithm}.jsonl", data)},
                                 "max_length": 64},
                        "train": {"lr": 1e-3, "batch_size": 4, "max_steps": 2, "progress": False, "plots": False},
                        **({algorithm: sections[algorithm]} if algorithm in sections else {})}
            for algorithm, data in rows.items()}


NO_SCORE_HEAD = {"cohere", "granite"}
"""Families without a transformers sequence-classification model: no reward model, PPO with a shared critic."""


@pytest.mark.parametrize("name", FAMILIES)
def test_every_trainer_runs_two_steps(name, family_dir, tmp_path):
    from align.config import recipe_from_dict
    from align.trainers import TRAINERS

    for algorithm, raw in trainer_recipes(family_dir(name), supported(name)[0], tmp_path).items():
        if name in NO_SCORE_HEAD and algorithm == "reward":
            with pytest.raises(AlignError, match=f"model type '{name}' has no sequence-classification model"):
                TRAINERS[algorithm].from_recipe(recipe_from_dict(raw))
            continue
        if name in NO_SCORE_HEAD and algorithm == "ppo":
            raw["ppo"]["critic"] = "shared"
        record = TRAINERS[algorithm].from_recipe(recipe_from_dict(raw)).fit()
        assert torch.isfinite(torch.tensor(record["loss"])), (algorithm, record)
        with open(tmp_path / algorithm / "metrics.jsonl") as f:
            assert [json.loads(line)["step"] for line in f] == [1, 2], algorithm


# ---- what Align refuses, with an error naming the model type and the setting ----------------------

class ScaledLogitsLlama(T.LlamaForCausalLM):
    """A stand-in for a family whose forward post-processes its logits in a way Align does not know."""

    def forward(self, *args, **kwargs):
        out = super().forward(*args, **kwargs)
        out.logits = out.logits * 1.7
        return out


def test_a_model_whose_logits_align_cannot_reproduce_is_refused():
    config = T.LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                           num_attention_heads=4, num_key_value_heads=2, initializer_range=0.2)
    with pytest.raises(AlignError, match="model type 'llama'.*differ from the model's own forward"):
        Policy(ScaledLogitsLlama(config), tokenizer=None)


def test_a_separate_reference_model_whose_logits_align_cannot_reproduce_is_refused():
    """(`reference_model: <path>` was only probed for layouts: a reference with such logits gave
    reference log-probs up to 2.8 nats off its own forward's, as a policy it was refused)"""
    config = T.LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                           num_attention_heads=4, num_key_value_heads=2, initializer_range=0.2)
    policy = Policy(build("llama"), tokenizer=None)
    with pytest.raises(AlignError, match="model type 'llama'.*differ from the model's own forward"):
        policy.use_reference_model(ScaledLogitsLlama(config))


LONGROPE = {"rope_scaling": {"rope_type": "longrope", "short_factor": [1.0] * 4, "long_factor": [4.0] * 4},
            "original_max_position_embeddings": 32}
"""Phi-3.5-mini's rotary embedding (its switch at 4,096 tokens here at 32)."""


def test_rope_that_a_forwards_longest_sequence_rescales_is_refused_past_its_switch(tmp_path):
    """(a packed row, padded batch or group holding one sequence past the switch rescaled every other
    one in it: up to 2 nats per token off their own forward's log-probs, no error)"""
    from align.config import recipe_from_dict
    from align.models.layouts import rope_switch_length
    from align.toy import chat_rows, prompt_rows
    from align.trainers import GRPOTrainer, SFTTrainer

    model = build("phi3", sliding_window=None, **LONGROPE)
    assert rope_switch_length(model) == 32 and rope_switch_length(build("phi3")) is None
    assert rope_switch_length(build("llama", rope_scaling={"rope_type": "dynamic", "factor": 2.0})) == 256
    short, long = torch.randint(2, VOCAB, (1, 10)), torch.randint(2, VOCAB, (1, 40))
    position_ids = torch.cat([torch.arange(10), torch.arange(40)])[None]
    with torch.no_grad():  # the reason: a short sequence packed with a long one is computed otherwise
        alone = model(input_ids=short).logits
        packed = model(input_ids=torch.cat([short, long], 1), position_ids=position_ids).logits[:, :10]
    assert (packed - alone).abs().max() > 0.01
    path = tmp_path / "phi3-longrope"
    model.save_pretrained(path)
    T.AutoTokenizer.from_pretrained(resolve("builtin:tiny-llama")).save_pretrained(path)
    recipe = {"algorithm": "sft", "output_dir": str(tmp_path / "run"),
              "model": {"name_or_path": str(path), "dtype": "float32"},
              "data": {"train": {"path": write_jsonl(tmp_path / "sft.jsonl", chat_rows(8))}, "max_length": 33},
              "train": {"max_steps": 1, "progress": False, "plots": False}}
    with pytest.raises(AlignError, match=r"past 32 tokens.*reach 33 tokens \(data.max_length\).*at most 32"):
        SFTTrainer.from_recipe(recipe_from_dict(recipe))
    SFTTrainer.from_recipe(recipe_from_dict({**recipe, "data": {**recipe["data"], "max_length": 32}}))
    grpo = {**recipe, "algorithm": "grpo",
            "data": {"train": {"path": write_jsonl(tmp_path / "grpo.jsonl", prompt_rows(4))}, "max_length": 24},
            "grpo": {"group_size": 2, "sampling": {"max_new_tokens": 16}, "rewards": [{"fn": "exact_answer"}]}}
    with pytest.raises(AlignError, match=r"reach 40 tokens \(data.max_length \+ grpo.sampling.max_new_tokens\)"):
        GRPOTrainer.from_recipe(recipe_from_dict(grpo))
    scorer = tmp_path / "phi3-longrope-rm"  # a reward model scores prompt + completion pairs packed in a row
    config = T.Phi3Config(**{**model.config.to_dict(), "num_labels": 1, "architectures": None})
    T.Phi3ForSequenceClassification(config).save_pretrained(scorer)
    T.AutoTokenizer.from_pretrained(resolve("builtin:tiny-llama")).save_pretrained(scorer)
    grpo = {**grpo, "model": {"name_or_path": "builtin:tiny-llama", "dtype": "float32"},
            "grpo": {**grpo["grpo"], "rewards": [{"fn": str(scorer)}]}}
    with pytest.raises(AlignError, match=r"the reward model grpo.rewards\[0\] .*past 32 tokens.*reach 40 tokens"):
        GRPOTrainer.from_recipe(recipe_from_dict(grpo))


def test_layer_kinds_a_shared_prompt_mask_cannot_express_are_refused():
    config = T.Qwen2Config(num_hidden_layers=2, layer_types=["full_attention", "chunked_attention"])
    with pytest.raises(AlignError, match="'qwen2' has 'chunked_attention' layers, which no attention mask keeps"):
        layer_windows(config)


def test_attention_implementations_without_4d_masks_are_refused_for_shared_prompts():
    config = T.LlamaConfig(num_hidden_layers=1)
    config._attn_implementation = "flash_attention_2"
    allowed = torch.ones(1, 1, 3, 3, dtype=torch.bool).tril()
    with pytest.raises(AlignError, match="flash_attention_2.*shared_prompt: false"):
        shared_prompt_masks(config, allowed, torch.arange(3)[None], torch.float32)


def test_forwards_on_cuda_leave_out_the_cudnn_attention_kernel(monkeypatch):
    """On CUDA every Align forward (and sampler) runs SDPA without cuDNN's kernel, which builds a
    plan for each new shape (packed rows change shape every micro-batch); flash and memory-efficient
    stay allowed; on a CPU nothing changes. The flags are what SDPA's dispatcher reads."""
    from align.models.packed import attention_kernels

    backends = torch.backends.cuda
    before = (backends.cudnn_sdp_enabled(), backends.flash_sdp_enabled(), backends.mem_efficient_sdp_enabled())
    with attention_kernels(torch.device("cuda")):
        assert not backends.cudnn_sdp_enabled()
        assert backends.flash_sdp_enabled() and backends.mem_efficient_sdp_enabled() and backends.math_sdp_enabled()
    assert (backends.cudnn_sdp_enabled(), backends.flash_sdp_enabled(), backends.mem_efficient_sdp_enabled()) == before
    with attention_kernels(torch.device("cpu")):
        assert backends.cudnn_sdp_enabled() == before[0]
    model = torch.nn.Linear(2, 2)
    monkeypatch.setattr("align.rollout.sampling.model_device", lambda m: torch.device("cuda"))
    with inference(model):
        assert not backends.cudnn_sdp_enabled() and not model.training
