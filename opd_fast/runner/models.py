"""Models: load HF causal LMs from local directories and expose hidden states + LM heads.

The runner never asks a model for logits when scoring or learning: it runs the *base* model
(``last_hidden_state``, final norm applied) and reads the head from ``get_output_embeddings()``, so
the fused loss can compare teacher and student without an ``N x V`` tensor. A ``Head`` carries
what turns hidden states into logits (weight, bias, the logit scale or softcap a config declares);
tied embeddings need nothing special because ``get_output_embeddings()`` returns the tied module.

Public API: ``LoadedModel``, ``Head``, ``Teacher``, ``load_model``, ``forward_hidden``, ``position_ids``,
``head_logits`` (rollout/eval sampling only), ``token_logprobs``, ``check_compatible``,
``load_run_models``, ``load_tokenizer``, ``torch_threads``.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import json
import warnings
from collections.abc import Collection, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    PreTrainedModel,
    PreTrainedTokenizerBase,
    PreTrainedTokenizerFast,
)

import opd_fast

from .config import LoraConfig, RunConfig
from .data import encode_prompt
from .hub import model_directory

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class Head:
    """``logits = softcap(scale * (h @ weight^T + bias))`` (temperature applied by the caller)."""

    weight: torch.Tensor
    bias: torch.Tensor | None
    scale: float = 1.0
    softcap: float | None = None

    def loss_kwargs(self, side: str) -> dict[str, Any]:
        """Keyword arguments of ``fused_linear_kl`` for this head on ``side`` ("student"/"teacher")."""
        return {f"{side}_bias": self.bias, f"{side}_logit_scale": self.scale, f"{side}_softcap": self.softcap}


@dataclass
class LoadedModel:
    """A causal LM with its decoder (hidden states), head and tokenizer."""

    name: str
    model: nn.Module  # what trains / saves (a PeftModel for LoRA students)
    decoder: nn.Module  # returns last_hidden_state
    tokenizer: PreTrainedTokenizerBase
    path: str
    # Dtype of the forward's math when it differs from the weights' (fp32 master weights, bf16 compute)
    compute_dtype: torch.dtype | None = None

    def autocast(self) -> contextlib.AbstractContextManager[Any]:
        """Autocast to ``compute_dtype`` (nothing to do when the weights already have it)."""
        if self.compute_dtype is None or self.compute_dtype == self.head.weight.dtype:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.compute_dtype)

    @property
    def head(self) -> Head:
        """Read fresh each time: the weight is the live parameter the optimizer updates."""
        return output_head(self.model)

    @property
    def device(self) -> torch.device:
        return self.head.weight.device


@dataclass
class Teacher:
    """One configured teacher: its model, the vocabulary size the loss compares, its loss weight and
    temperature (None = the loss's) and the domains routed to it (empty = every domain no other teacher
    claims)."""

    model: LoadedModel
    vocab_size: int
    weight: float = 1.0
    domains: list[str] = field(default_factory=list)
    temperature: float | None = None

    def loss_temperature(self, default: float) -> float:
        return default if self.temperature is None else self.temperature

    @property
    def name(self) -> str:
        return self.model.name

    @property
    def head(self) -> Head:
        return self.model.head


def _causal_lm(model: nn.Module) -> PreTrainedModel:
    """The transformers model under a possible peft wrapper."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def output_head(model: nn.Module) -> Head:
    """A causal LM's output head with the logit scale and softcap its config declares."""
    lm = _causal_lm(model)
    out = lm.get_output_embeddings()
    cfg = lm.config
    scale = float(getattr(cfg, "logit_scale", None) or 1.0)
    if getattr(cfg, "logits_scaling", None):  # Granite divides by it
        scale /= float(cfg.logits_scaling)
    softcap = getattr(cfg, "final_logit_softcapping", None)
    return Head(out.weight, getattr(out, "bias", None), scale, None if softcap is None else float(softcap))


def decoder_of(model: nn.Module) -> nn.Module:
    """The module under a causal LM's head (a possible peft wrapper unwrapped): it returns ``last_hidden_state``."""
    lm = _causal_lm(model)
    return getattr(lm, lm.base_model_prefix)


def load_tokenizer(path: str, trust_remote_code: bool) -> PreTrainedTokenizerBase:
    """The tokenizer class the directory declares.

    transformers 5's ``AutoTokenizer`` prefers the model type's tokenizer class (e.g. ``Qwen2Tokenizer``
    for a qwen2 config) over a generic fast tokenizer saved beside it, which re-segments text (a
    character tokenizer loses its spaces); a declared generic class is loaded as such.
    """
    config_file = Path(path) / "tokenizer_config.json"
    declared = json.loads(config_file.read_text()).get("tokenizer_class") if config_file.is_file() else None
    if declared in ("TokenizersBackend", "PreTrainedTokenizerFast"):
        return PreTrainedTokenizerFast.from_pretrained(path)
    return AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)


def _enable_checkpointing(lm: PreTrainedModel) -> None:
    """HF's activation (gradient) checkpointing, non-reentrant: it works with frozen inputs (LoRA) and autocast.
    transformers >= 5.2x renamed the API; older versions only have ``gradient_checkpointing_enable``."""
    kwargs = {"use_reentrant": False}
    if hasattr(lm, "activation_checkpointing_enable"):
        lm.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        lm.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)


def load_model(
    path: str,
    *,
    name: str = "model",
    revision: str = "",
    local_files_only: bool = False,
    dtype: str = "float32",
    compute_dtype: str | None = None,
    device: str = "cpu",
    attn_implementation: str = "sdpa",
    trust_remote_code: bool = False,
    lora: LoraConfig | None = None,
    adapter_path: str | None = None,
    trainable: bool = False,
    gradient_checkpointing: bool = False,
) -> LoadedModel:
    """Load model + tokenizer from a local directory or a cached Hub model id (``revision``); optionally
    wrap a LoRA adapter (peft). Weights are stored in ``dtype``; the forward runs under autocast to
    ``compute_dtype`` when given and different."""
    path = model_directory(path, revision=revision, local_files_only=local_files_only, label=name)
    try:
        lm = AutoModelForCausalLM.from_pretrained(
            path, dtype=DTYPES[dtype], attn_implementation=attn_implementation, trust_remote_code=trust_remote_code
        )
        tokenizer = load_tokenizer(path, trust_remote_code)
    except (OSError, ValueError) as exc:  # missing files; a config.json transformers does not recognize
        raise ValueError(f"{name}: cannot load a model/tokenizer from {path!r}: {exc}") from exc
    lm.to(device)
    if trainable and gradient_checkpointing:
        _enable_checkpointing(lm)
    model: nn.Module = lm
    if lora is not None:
        from peft import LoraConfig as PeftLoraConfig
        from peft import PeftModel, get_peft_model

        if adapter_path:
            model = PeftModel.from_pretrained(lm, adapter_path, is_trainable=trainable)
        else:
            cfg = PeftLoraConfig(r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
                                 target_modules=list(lora.target_modules), task_type="CAUSAL_LM")
            model = get_peft_model(lm, cfg)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    if lora is None:  # peft already froze everything but the adapter
        model.requires_grad_(trainable)
    model.train(trainable)
    return LoadedModel(name=name, model=model, decoder=decoder_of(lm), tokenizer=tokenizer, path=path,
                       compute_dtype=None if compute_dtype is None else DTYPES[compute_dtype])


@contextlib.contextmanager
def torch_threads(threads: int) -> Iterator[None]:
    """Use ``threads`` intra-op threads for the run (0 = leave torch's setting), restored afterwards."""
    previous = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def position_ids(attention_mask: torch.Tensor) -> torch.Tensor:
    """Positions that skip left padding: the first real token is position 0."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


def forward_hidden(
    lm: LoadedModel,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    *,
    cache: Any = None,
    positions: torch.Tensor | None = None,
) -> tuple[torch.Tensor, Any]:
    """Final hidden states ``(B, L, H)`` of ``input_ids``; with a cache, ``attention_mask`` spans past + new."""
    if positions is None:
        positions = position_ids(attention_mask)[:, -input_ids.shape[1]:]
    kwargs = {_cache_kwarg(type(lm.decoder)): cache} if cache is not None else {}
    with lm.autocast():
        out = lm.decoder(input_ids=input_ids, attention_mask=attention_mask, position_ids=positions,
                         use_cache=cache is not None, **kwargs)
    return out.last_hidden_state, cache  # the cache object is updated in place


@functools.cache
def _cache_kwarg(decoder_cls: type) -> str:
    """transformers >= 5.2x names the KV cache ``cache``; earlier versions ``past_key_values``."""
    return "cache" if "cache" in inspect.signature(decoder_cls.forward).parameters else "past_key_values"


# Rows up to which the CPU sampling head multiplies in weight-major order. MKL's product of a few rows
# against a transposed weight (``h @ W.T``, nn.Linear's layout) takes a slow small-M path on this
# project's CPUs: 8 x 128 against a 32000 x 128 head took 7-8 ms with 2 idle threads, the same product as
# ``(W @ h.T).T`` 2.8 ms. Weight-major won at 4 and 8 rows in every measurement, at 16 in two of three,
# and tied at 1; from a few dozen rows on, results were mixed (bench/results/rollout_profile_cpu.md).
# A fixed rule rather than a timing probe, so that a run's logits never depend on a measurement.
WEIGHT_MAJOR_MAX_ROWS = 16


def head_logits(hidden: torch.Tensor, head: Head, temperature: float = 1.0) -> torch.Tensor:
    """fp32 logits for the few rows that need them (the sampler's last position, eval); ``(..., V)``."""
    weight, h = head.weight.float(), hidden.float()
    rows = h.reshape(-1, h.shape[-1])
    if h.device.type == "cpu" and rows.shape[0] <= WEIGHT_MAJOR_MAX_ROWS:
        z = (weight @ rows.T).T.contiguous().reshape(*h.shape[:-1], weight.shape[0])
    else:
        z = h @ weight.T
    if head.bias is not None:
        z = z + head.bias.float()
    if head.scale != 1:  # multiplying or dividing by 1 is exact: skip those passes over the logits
        z = z * head.scale
    if head.softcap is not None:
        z = head.softcap * torch.tanh(z / head.softcap)
    return z if temperature == 1 else z / temperature


def token_logprobs(hidden: torch.Tensor, head: Head, tokens: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """Differentiable log-prob of ``tokens`` ``(N,)`` under ``head`` at ``hidden`` ``(N, H)``, no logits kept."""
    return opd_fast.fused_linear_logprobs(hidden, head.weight, tokens, temperature=temperature, bias=head.bias,
                                          logit_scale=head.scale, softcap=head.softcap)


def _first_diff(a: dict[str, int], b: dict[str, int]) -> list[str]:
    diffs = [f"{tok!r}: {a.get(tok)} vs {b.get(tok)}" for tok in sorted(set(a) | set(b)) if a.get(tok) != b.get(tok)]
    return diffs[:5]


def check_compatible(student: LoadedModel, teacher: LoadedModel, chat_template: bool = False) -> int:
    """Check a teacher against the student; return the vocabulary size the loss compares.

    Token->id maps and special tokens must agree (error naming the first differing tokens); head
    sizes may differ by padding as long as both cover the tokenizer. Chat templates that render a
    probe conversation differently only warn, since the runner can still feed identical ids.
    """
    s_tok, t_tok = student.tokenizer, teacher.tokenizer
    diffs = _first_diff(s_tok.get_vocab(), t_tok.get_vocab())
    if diffs:
        raise ValueError(
            f"tokenizer mismatch between student ({student.path}) and teacher {teacher.name!r} ({teacher.path}): "
            f"token->id maps differ, first differences: {'; '.join(diffs)}"
        )
    s_special = {k: getattr(s_tok, k) for k in ("bos_token_id", "eos_token_id", "pad_token_id", "unk_token_id")}
    t_special = {k: getattr(t_tok, k) for k in s_special}
    if s_special != t_special:
        bad = {k: (s_special[k], t_special[k]) for k in s_special if s_special[k] != t_special[k]}
        raise ValueError(f"special tokens differ between student and teacher {teacher.name!r} (student, teacher): "
                         f"{bad}")
    v_s, v_t, n_tok = student.head.weight.shape[0], teacher.head.weight.shape[0], len(s_tok)
    if min(v_s, v_t) < n_tok:
        raise ValueError(
            f"head vocab sizes (student {v_s}, teacher {teacher.name!r} {v_t}) must cover the tokenizer's "
            f"{n_tok} tokens"
        )
    probe = "Hello world 12+3=15\n"
    if s_tok(probe)["input_ids"] != t_tok(probe)["input_ids"]:
        warnings.warn(
            f"student and teacher {teacher.name!r} tokenizers segment {probe!r} differently: "
            f"{s_tok(probe)['input_ids']} vs {t_tok(probe)['input_ids']}; the runner tokenizes with the student's",
            stacklevel=2,
        )
    if chat_template:
        ids = [encode_prompt(tok, probe, chat_template=True) for tok in (s_tok, t_tok)]
        if ids[0] != ids[1]:
            warnings.warn(
                f"chat templates of student and teacher {teacher.name!r} render differently: {ids[0]} vs {ids[1]}; "
                "the runner feeds both the student's rendering",
                stacklevel=2,
            )
    return min(v_s, v_t)


def load_run_models(
    config: RunConfig, checkpoint: str | None = None, *, trainable: bool = True, to_shard: Collection[str] = ()
) -> tuple[LoadedModel, dict[str, Teacher]]:
    """Student (from ``checkpoint/student`` when given) and the teachers by name, each checked against it.

    The models named in ``to_shard`` ("student", teacher names) are loaded on the CPU: sharding moves each
    rank's shard to ``run.device``, so a model too large for one device never lands there whole."""
    r, s = config.run, config.student
    student_path, revision, adapter = s.path, s.revision, None
    if checkpoint is not None:
        if s.lora is None:
            student_path, revision = str(Path(checkpoint) / "student"), ""
        else:
            adapter = str(Path(checkpoint) / "student")
    student = load_model(student_path, name="student", revision=revision, local_files_only=s.local_files_only,
                         dtype=s.dtype or "float32", compute_dtype=r.dtype,
                         device="cpu" if "student" in to_shard else r.device,
                         gradient_checkpointing=s.gradient_checkpointing,
                         attn_implementation=s.attn_implementation, trust_remote_code=s.trust_remote_code,
                         lora=s.lora, adapter_path=adapter, trainable=trainable)
    teachers = {}
    for name, t in config.teachers.items():
        model = load_model(t.path, name=name, revision=t.revision, local_files_only=t.local_files_only,
                           dtype=t.dtype or r.dtype, device="cpu" if name in to_shard else r.device,
                           attn_implementation=t.attn_implementation,
                           trust_remote_code=t.trust_remote_code)
        vocab = check_compatible(student, model, config.data.chat_template)
        teachers[name] = Teacher(model, vocab, t.weight, list(t.domains), t.temperature)
    return student, teachers
