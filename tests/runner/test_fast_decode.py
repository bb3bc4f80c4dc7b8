"""The fast decode step is HF's computation: per-step hidden states and logits, greedy and sampled
rollouts, stop strings and teacher-corrected rollouts agree across a matrix of decoder configs
(Llama, Mistral, Qwen2, Qwen3; multi-head and grouped-query attention; biases; scaled rotary; tied
heads; left padding of different prompt lengths); and the rule that picks the path is explicit."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, GPT2Config, LlamaConfig, MistralConfig, Qwen2Config, Qwen3Config

from opd_fast.models.tiny import char_tokenizer, save_model
from opd_fast.runner.config import CorrectionConfig, LoraConfig, RolloutConfig
from opd_fast.runner.correction import Corrector
from opd_fast.runner.data import Prompt
from opd_fast.runner.decode import FastDecode, HFDecode, decode_path, fast_decode_unsupported, start_decode
from opd_fast.runner.models import Teacher, head_logits, load_model
from opd_fast.runner.rollout import rollout
from opd_fast.runner.score import Router

ALPHABET = "abcdefgh =\n"
PROMPTS = [Prompt(0, "abc=", "a", None), Prompt(1, "a=", "b", None), Prompt(2, "hhgg fed=", "a", None),
           Prompt(3, "fa=", "b", None)]

# name -> (config class, extra config keys): each row differs from plain Llama in what the fast step must honour.
ARCHS = {
    "llama": (LlamaConfig, {}),
    "llama-gqa-bias": (LlamaConfig, {"num_key_value_heads": 2, "attention_bias": True, "mlp_bias": True}),
    "llama-rope-linear-tied": (LlamaConfig, {"rope_parameters": {"rope_type": "linear", "factor": 2.0,
                                                                 "rope_theta": 10000.0},
                                             "tie_word_embeddings": True}),
    "llama-eager": (LlamaConfig, {"num_key_value_heads": 2}),
    "mistral-gqa": (MistralConfig, {"num_key_value_heads": 1, "sliding_window": 64}),
    "qwen2-gqa": (Qwen2Config, {"num_key_value_heads": 2}),
    "qwen3-gqa-head-dim": (Qwen3Config, {"num_key_value_heads": 2, "head_dim": 12}),
}


def build(path: Path, config_cls: type, seed: int = 0, attn: str = "sdpa", **extra) -> str:
    """A tiny random model whose every weight is far from its init (biases and norms included)."""
    tok = char_tokenizer(ALPHABET)
    keys = {"vocab_size": len(tok), "hidden_size": 32, "intermediate_size": 48, "num_hidden_layers": 2,
            "num_attention_heads": 4, "num_key_value_heads": 4, "max_position_embeddings": 128,
            "pad_token_id": tok.pad_token_id, "bos_token_id": tok.bos_token_id, "eos_token_id": tok.eos_token_id}
    model = AutoModelForCausalLM.from_config(config_cls(**{**keys, **extra}), attn_implementation=attn)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(torch.randn(p.shape, generator=generator) * 0.3 + ("norm" in name))
    return str(save_model(model, tok, path))


@pytest.fixture(scope="module")
def arch_models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("archs")
    return {name: build(root / name, cls, seed=i, attn="eager" if "eager" in name else "sdpa", **extra)
            for i, (name, (cls, extra)) in enumerate(ARCHS.items())}


def left_padded(lm, prompts: list[Prompt], new_tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Prompt ids ``(B, P)`` and a ``(B, P + new_tokens)`` mask over them, as the rollout lays them out."""
    ids = [lm.tokenizer(p.prompt, add_special_tokens=False)["input_ids"] for p in prompts]
    p_len = max(map(len, ids))
    step_ids = torch.full((len(ids), p_len), lm.tokenizer.pad_token_id)
    mask = torch.zeros((len(ids), p_len + new_tokens), dtype=torch.long)
    for i, row in enumerate(ids):
        step_ids[i, p_len - len(row):] = torch.tensor(row)
        mask[i, p_len - len(row):p_len] = 1
    return step_ids, mask


@pytest.mark.parametrize("arch", list(ARCHS))
def test_each_step_gives_hf_hidden_states_and_logits(arch_models: dict, arch: str) -> None:
    """Both paths fed the same tokens, with rows finishing at different steps (masked pad tokens)."""
    lm = load_model(arch_models[arch])
    steps = 7
    ids, mask = left_padded(lm, PROMPTS, steps)
    p_len = ids.shape[1]
    with torch.no_grad():
        hf, hidden_hf = start_decode(lm, ids, mask[:, :p_len], steps, "hf")
        fast, hidden_fast = start_decode(lm, ids, mask[:, :p_len], steps, "fast")
        assert isinstance(hf, HFDecode) and isinstance(fast, FastDecode)
        count = mask.sum(1)
        for step in range(steps):
            torch.testing.assert_close(hidden_fast, hidden_hf, atol=2e-5, rtol=2e-5)
            logits = head_logits(hidden_hf, lm.head)
            torch.testing.assert_close(head_logits(hidden_fast, lm.head), logits, atol=2e-5, rtol=2e-5)
            active = torch.arange(len(PROMPTS)) < len(PROMPTS) - step // 2  # the last rows finish first
            tokens = torch.where(active, logits.argmax(-1), lm.tokenizer.pad_token_id)
            mask[:, p_len + step] = active.long()
            count = count + active.long()
            positions = (count - 1)[:, None]
            live = mask[:, :p_len + step + 1]
            hidden_hf, hidden_fast = hf.step(tokens, live, positions), fast.step(tokens, live, positions)
        torch.testing.assert_close(hidden_fast, hidden_hf, atol=2e-5, rtol=2e-5)


def test_the_fast_step_reads_the_models_own_weights(arch_models: dict) -> None:
    """No copies: what the optimizer changes in place is what the next step computes with."""
    lm = load_model(arch_models["qwen3-gqa-head-dim"])
    ids, mask = left_padded(lm, PROMPTS, 2)
    with torch.no_grad():
        fast, _ = start_decode(lm, ids, mask[:, :ids.shape[1]], 2, "fast")
        hf, _ = start_decode(lm, ids, mask[:, :ids.shape[1]], 2, "hf")
        for p in lm.model.parameters():
            p.mul_(1.5)
        mask[:, ids.shape[1]] = 1
        step = (ids[:, -1], mask[:, :ids.shape[1] + 1], mask.sum(1, keepdim=True) - 1)
        torch.testing.assert_close(fast.step(*step), hf.step(*step), atol=2e-5, rtol=2e-5)


SAMPLINGS = {
    "greedy": RolloutConfig(max_new_tokens=12, temperature=0.0),
    "t1": RolloutConfig(max_new_tokens=12),
    "topk-topp": RolloutConfig(max_new_tokens=12, temperature=0.8, top_k=5, top_p=0.9),
    "stop": RolloutConfig(max_new_tokens=12, stop=["a", "e\n"]),
}


@pytest.mark.parametrize("arch", ["llama-gqa-bias", "mistral-gqa", "qwen2-gqa", "qwen3-gqa-head-dim"])
@pytest.mark.parametrize("sampling", list(SAMPLINGS))
def test_rollouts_are_hfs_under_one_seed(arch_models: dict, arch: str, sampling: str) -> None:
    """Same tokens, texts, stops and (to float rounding) recorded log-probs: the sampler consumes the same
    uniforms from the generator, so only a draw within rounding of a token boundary could differ."""
    lm = load_model(arch_models[arch])
    cfg = SAMPLINGS[sampling]
    hf, fast = (rollout(lm, PROMPTS, dataclasses.replace(cfg, decode=mode), torch.Generator().manual_seed(3))
                for mode in ("hf", "fast"))
    assert torch.equal(fast.input_ids, hf.input_ids) and torch.equal(fast.completion_mask, hf.completion_mask)
    assert fast.completions == hf.completions and fast.truncated == hf.truncated
    torch.testing.assert_close(fast.sampler_logprobs, hf.sampler_logprobs, atol=1e-5, rtol=1e-5)
    assert len(set(hf.completion_lengths())) > 1 or sampling == "greedy"  # rows really end at different steps


def test_teacher_corrected_rollouts_decode_the_teachers_on_the_same_path(arch_models: dict) -> None:
    student = load_model(arch_models["llama-gqa-bias"])
    teachers = {"ta": Teacher(load_model(arch_models["qwen2-gqa"], name="ta"), len(student.tokenizer), domains=["a"]),
                "tb": Teacher(load_model(arch_models["qwen3-gqa-head-dim"], name="tb"), len(student.tokenizer))}
    batches = []
    for mode in ("hf", "fast"):
        cfg = RolloutConfig(max_new_tokens=10, decode=mode)
        fix = Corrector(CorrectionConfig(topk=3, rate=0.7), cfg, student.tokenizer, teachers, Router(teachers),
                        torch.Generator().manual_seed(5))
        batches.append(rollout(student, PROMPTS, cfg, torch.Generator().manual_seed(4),
                               correction=fix.begin(PROMPTS, 1)))
    hf, fast = batches
    assert 0 < hf.num_corrected < hf.num_tokens  # the teachers really replaced some tokens, not all
    assert torch.equal(fast.input_ids, hf.input_ids) and torch.equal(fast.corrected_mask, hf.corrected_mask)
    torch.testing.assert_close(fast.sampler_logprobs, hf.sampler_logprobs, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("dtypes", [{"compute_dtype": "bfloat16"}, {"dtype": "bfloat16"}], ids=["autocast", "bf16"])
def test_bf16_follows_hfs_dtypes(arch_models: dict, dtypes: dict) -> None:
    """fp32 weights with bf16 compute (the same autocast) and pure bf16 weights: within bf16 rounding of HF."""
    lm = load_model(arch_models["qwen2-gqa"], **dtypes)
    ids, mask = left_padded(lm, PROMPTS, 1)
    mask[:, -1] = 1
    step = (ids[:, -1], mask, mask.sum(1, keepdim=True) - 1)
    with torch.no_grad():
        hidden = [start_decode(lm, ids, mask[:, :-1], 1, mode)[0].step(*step) for mode in ("hf", "fast")]
    torch.testing.assert_close(hidden[1], hidden[0], atol=3e-2, rtol=3e-2)


def _wrap_q_proj(lm) -> None:
    class Hooked(torch.nn.Linear):
        pass

    attn = lm.decoder.layers[0].self_attn
    hooked = Hooked(attn.q_proj.in_features, attn.q_proj.out_features, bias=attn.q_proj.bias is not None)
    hooked.load_state_dict(attn.q_proj.state_dict())
    attn.q_proj = hooked


def test_the_rule_picks_fast_only_where_it_is_hfs_computation(arch_models: dict, tmp_path: Path) -> None:
    total = 20
    for name in ARCHS:
        lm = load_model(arch_models[name])
        assert fast_decode_unsupported(lm, total) is None and decode_path(lm, "auto", total) == "fast"
        assert decode_path(lm, "hf", total) == "hf"
    unsupported = {
        "peft": lambda: load_model(arch_models["llama"], lora=LoraConfig(r=2, alpha=4)),
        "model type": lambda: load_model(build(tmp_path / "gpt2", GPT2Config, n_embd=32, n_layer=1, n_head=2,
                                               n_positions=64)),
        "sliding window": lambda: load_model(build(tmp_path / "mistral", MistralConfig, sliding_window=8)),
        "not a plain Linear": lambda: _patched(load_model(arch_models["llama"]), _wrap_q_proj),
        "forward hooks": lambda: _patched(load_model(arch_models["llama"]), lambda lm: lm.decoder.layers[1].mlp
                                          .register_forward_hook(lambda *_: None)),
        "rotary type": lambda: load_model(build(tmp_path / "dyn", LlamaConfig, rope_parameters={
            "rope_type": "dynamic", "factor": 2.0, "rope_theta": 10000.0})),
    }
    for reason, make in unsupported.items():
        if reason == "peft":
            pytest.importorskip("peft")
        lm = make()
        assert reason in (fast_decode_unsupported(lm, total) or ""), reason
        assert decode_path(lm, "auto", total) == "hf"
        with pytest.raises(ValueError, match=f"rollout.decode = 'fast' cannot decode .*{reason}"):
            decode_path(lm, "fast", total)
    window = load_model(arch_models["mistral-gqa"])  # a window of 64: fast up to 64 tokens, HF's beyond
    assert decode_path(window, "auto", 64) == "fast" and decode_path(window, "auto", 65) == "hf"


def _patched(lm, patch):
    patch(lm)
    return lm


def test_an_unsupported_student_rolls_out_on_hfs_path(arch_models: dict) -> None:
    pytest.importorskip("peft")
    lm = load_model(arch_models["llama"], lora=LoraConfig(r=2, alpha=4))
    batch = rollout(lm, PROMPTS, RolloutConfig(max_new_tokens=4, temperature=0.0))
    assert batch.num_tokens > 0
    with pytest.raises(ValueError, match="peft"):
        rollout(lm, PROMPTS, RolloutConfig(max_new_tokens=4, decode="fast"))


def test_the_config_key_names_its_choices(make_config, tmp_path: Path) -> None:
    assert make_config(tmp_path).rollout.decode == "auto"
    with pytest.raises(ValueError, match=r"'rollout.decode' must be one of \('auto', 'hf', 'fast'\)"):
        make_config(tmp_path, rollout={"max_new_tokens": 6, "micro_batch_size": 2, "decode": "compiled"})
