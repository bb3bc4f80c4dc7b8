"""Run configuration: a TOML file mapped onto typed dataclasses, validated once at start-up.

Public API (stable, used by the demo and the CLI):

- ``RunConfig`` and its sections (``RunSection``, ``StudentConfig``, ``TeacherConfig``, ``DataConfig``,
  ``RolloutConfig`` (with ``CorrectionConfig``), ``LossConfig``, ``OptimConfig``, ``CheckpointConfig``,
  ``MetricsConfig``, ``EvalConfig``): plain dataclasses with defaults, so code can also build a config directly.
- ``load_config(path, overrides=())``: read TOML, apply ``--set key=value`` overrides
  (``"optim.lr=1e-3"``, ``"teachers.main.weight=2"``; values parsed as TOML, falling back to strings),
  and validate.
- ``config_from_dict(data)`` / ``config_to_dict(config)``: the same mapping without a file.
- ``validate_config(config)``: raises ``ValueError`` naming the offending key.

Unknown keys, wrong types and out-of-range values are errors naming the full dotted key, because a
typo in a training config that silently falls back to a default wastes a whole run.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import tomllib

from ..core.call import BACKEND_NAMES
from ..plugins import is_code_spec
from .hub import is_model_id
from .sources import FIELDS, FORMATS

DIVERGENCES = ("forward_kl", "reverse_kl", "jsd", "tvd")
SIGNALS = ("hidden", "topk", "sampled")
DTYPES = ("float32", "bfloat16", "float16")
SCHEDULES = ("cosine", "linear", "constant")
PARALLEL = ("ddp", "fsdp")
DECODE_MODES = ("auto", "hf", "fast")


@dataclass
class RunSection:
    out_dir: str = "runs/opd"
    seed: int = 0
    device: str = "cpu"
    dtype: str = "float32"  # compute dtype: the student's forward and loss (autocast), and the teachers' default
    # torch intra-op threads for the run; 0 = torch's default. Small models on shared CPUs run far
    # faster with 1 (thread spin-waits dominate tiny GEMMs when cores are oversubscribed).
    threads: int = 0
    # "strict": the teacher scores micro-batches on a worker thread while the student samples the next
    # ones and learns from the scored ones; "serial": stages one after another. Same computation.
    pipeline: str = "strict"
    # Async mode when >= 1: rollouts run up to this many optimizer steps ahead of the learner, on a
    # snapshot of the student (runner/async_rollout.py); 0 = on-policy (the pipeline mode above).
    max_staleness: int = 0
    # Async mode: sampled-token terms (loss.signal = "sampled", the verifier term) are weighted per token
    # by min(importance_clip, q_now / q_sampler); 0 = unweighted. Full-vocab / top-k terms never are.
    importance_clip: float = 2.0
    # With more than one process (torchrun): "ddp" replicates the student on every rank and sums its gradients
    # once per step; "fsdp" shards its weights, gradients and optimizer state across the ranks (FSDP2), for
    # students whose training state does not fit one device. Ignored with one process.
    parallel: str = "ddp"


@dataclass
class LoraConfig:
    r: int = 8
    alpha: int = 16
    dropout: float = 0.0
    target_modules: list[str] = field(default_factory=lambda: ["q_proj", "v_proj"])


@dataclass
class StudentConfig:
    # A local model directory, or a Hugging Face model id (``org/name``) read from the HF cache.
    path: str = ""
    revision: str = ""  # branch, tag or commit of a model id; "" = the repository's default branch
    local_files_only: bool = False  # never download a model id (as HF_HUB_OFFLINE=1 does)
    # The student's weight (master) dtype: "" = float32, so a bfloat16 run (run.dtype) keeps fp32 master weights
    # and optimizer state and computes its forward and loss in bf16 under autocast; "bfloat16" = pure bf16.
    dtype: str = ""
    gradient_checkpointing: bool = False  # recompute activations in backward (HF's gradient checkpointing)
    attn_implementation: str = "sdpa"
    trust_remote_code: bool = False
    lora: LoraConfig | None = None


@dataclass
class TeacherConfig:
    path: str = ""  # a local model directory or a Hugging Face model id, as ``student.path``
    revision: str = ""
    local_files_only: bool = False
    dtype: str = ""  # the teacher's weight and compute dtype; "" = run.dtype (teachers never train)
    # Domains routed to this teacher; empty = every domain not claimed by another teacher.
    domains: list[str] = field(default_factory=list)
    weight: float = 1.0
    # Loss temperature on this teacher's rows (student and teacher logits alike), to calibrate a teacher
    # whose distribution is sharper or flatter than the others'; unset = loss.temperature.
    temperature: float | None = None
    attn_implementation: str = "sdpa"
    trust_remote_code: bool = False
    # With more than one process: shard this frozen teacher's weights across the ranks (FSDP2, forward only)
    # instead of loading all of it on every rank. Ignored with one process.
    shard: bool = False


@dataclass
class DataConfig:
    # Exactly one of `prompts` (a prompt file or a saved dataset directory, see runner/sources.py) or `task`
    # (a built-in task's name, or a custom task class as "module:Class" / "file.py:Class").
    prompts: str = ""
    task: str = ""
    eval_prompts: str = ""
    format: str = "auto"  # "auto" (by directory / file suffix) | "jsonl" | "json" | "csv" | "parquet" | "arrow" |
    #                       "dataset_dir" (a save_to_disk directory)
    columns: dict[str, str] = field(default_factory=dict)  # field (prompt/messages/reference/domain) -> column
    split: str = "train"  # the split of a saved DatasetDict directory used for training
    eval_split: str = "test"  # ... and for evaluation (data.eval_prompts)
    num_prompts: int = 256  # pool size drawn from a task's train split
    mixture: dict[str, float] = field(default_factory=dict)  # domain -> weight; empty = by pool size
    prompts_per_step: int = 4
    group_size: int = 2
    sampler: str = "adaptive"  # "adaptive" (down-weights prompts the student already matches) | "uniform"
    sampler_min_weight: float = 0.1
    sampler_ema: float = 0.5
    chat_template: bool = False


@dataclass
class CorrectionConfig:
    """Teacher-corrected rollouts (runner/correction.py): a student token the routed teacher rejects is
    replaced by a teacher sample."""

    topk: int = 0  # reject a token outside the teacher's top-k; 0 = no rank rule
    min_prob: float = 0.0  # reject a token the teacher gives less probability (rollout temperature); 0 = none
    rate: float = 1.0  # probability that a rejected token is replaced, at step 1
    decay_steps: int = 0  # rate falls linearly to 0 at step decay_steps + 1 (then no teacher decode); 0 = constant


@dataclass
class RolloutConfig:
    max_new_tokens: int = 32
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    stop: list[str] = field(default_factory=list)
    micro_batch_size: int = 8
    # Decode step: "fast" = the written-out step of the Llama/Mistral/Qwen2/Qwen3 family on a static KV
    # cache (runner/decode.py), "hf" = the model's own forward, "auto" = fast wherever it applies.
    decode: str = "auto"
    # Once at least this share of a micro-batch's rows has finished (EOS / stop string) while others still
    # decode, those rows leave the decode batch and are scored by the teacher (on the strict pipeline's worker
    # thread) while the rest decodes; 0 = off (the default: on 2 CPU cores it was not faster, see the README's
    # runner-speed section). Training rollouts only, not with a correction or sharded models.
    handoff_fraction: float = 0.0
    correction: CorrectionConfig | None = None  # student rollouts only; off-policy and eval ones never


@dataclass
class LossConfig:
    divergence: str = "reverse_kl"
    beta: float = 0.5
    temperature: float = 1.0
    signal: str = "hidden"  # "hidden" (full vocab) | "topk" | "sampled"
    topk: int = 32
    backend: str = "auto"
    # Fraction of steps trained on off-policy completions instead of student samples (0 = fully
    # on-policy). TRL's GKD ``lmbda`` is the complementary, on-policy fraction.
    off_policy_fraction: float = 0.0
    off_policy_source: str = "dataset"  # "dataset" (references) | "teacher" (teacher samples)
    kd_weight: float = 1.0  # weight of the teacher term; 0 = no teacher scoring (pure SFT / verifier runs)
    sft_weight: float = 0.0
    verifier_weight: float = 0.0
    # domain -> "module:function" or "file.py:function" (relative to the config file). Trusted code: it
    # is imported and run in the training process.
    verifiers: dict[str, str] = field(default_factory=dict)
    # domain -> a Hugging Face sequence-classification reward model (one output): a local directory or a model id;
    # its scores, standardized per domain, replace the verifier's reward there.
    reward_models: dict[str, str] = field(default_factory=dict)
    # A model directory is data: its Python (remote code) runs only when this is set.
    reward_trust_remote_code: bool = False


@dataclass
class OptimConfig:
    steps: int = 100
    lr: float = 1e-4
    weight_decay: float = 0.0
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    warmup_steps: int = 0
    schedule: str = "cosine"  # after the linear warm-up: "cosine" | "linear" decay to min_lr_ratio, or "constant"
    min_lr_ratio: float = 0.1
    grad_clip: float = 1.0
    max_consecutive_skips: int = 5


@dataclass
class CheckpointConfig:
    every: int = 50
    keep: int = 2


@dataclass
class MetricsConfig:
    progress: bool = True
    # Trackers (each needs its package; 'opd-fast[tracking]' installs all): TensorBoard under RUN_DIR/tensorboard,
    # Weights & Biases (wandb_mode "offline" writes RUN_DIR/wandb only; "" = wandb's default / WANDB_MODE) and
    # MLflow (mlflow_tracking_uri "" = MLflow's default / MLFLOW_TRACKING_URI; a server, database or file: URI).
    tensorboard: bool = True
    wandb: bool = False
    wandb_project: str = "opd-fast"
    wandb_mode: str = ""
    mlflow: bool = False
    mlflow_tracking_uri: str = ""
    mlflow_experiment: str = "opd-fast"
    # Every N steps (0 = never) log this many of the step's completions (prompt, completion, reward, divergence)
    samples_every: int = 0
    samples_per_step: int = 4


@dataclass
class EvalConfig:
    every: int = 0  # 0 = only at the end
    num_prompts: int = 32
    sampled: bool = True
    at_end: bool = True


@dataclass
class RunConfig:
    run: RunSection = field(default_factory=RunSection)
    student: StudentConfig = field(default_factory=StudentConfig)
    teachers: dict[str, TeacherConfig] = field(default_factory=dict)
    data: DataConfig = field(default_factory=DataConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    metrics: MetricsConfig = field(default_factory=MetricsConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", str(tp))


def _convert(value: Any, tp: Any, key: str) -> Any:
    """Check/convert one TOML value against a dataclass field type; errors name ``key``."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if value is None:
            return None
        return _convert(value, args[0], key)
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ValueError(f"config key {key!r} must be a table, got {type(value).__name__}")
        return _build(tp, value, key)
    if origin is dict:
        _, val_tp = typing.get_args(tp)
        if not isinstance(value, dict):
            raise ValueError(f"config key {key!r} must be a table, got {type(value).__name__}")
        return {str(k): _convert(v, val_tp, f"{key}.{k}") for k, v in value.items()}
    if origin is list:
        (item_tp,) = typing.get_args(tp)
        if not isinstance(value, list):
            raise ValueError(f"config key {key!r} must be a list, got {type(value).__name__}")
        return [_convert(v, item_tp, f"{key}[{i}]") for i, v in enumerate(value)]
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if tp is int and isinstance(value, bool):
        raise ValueError(f"config key {key!r} must be int, got bool")
    if not isinstance(value, tp):
        raise ValueError(f"config key {key!r} must be {_type_name(tp)}, got {type(value).__name__} {value!r}")
    return value


# Keys that were renamed: the old name is an error that names the new one (and why it changed).
RENAMED_KEYS = {
    "loss.lmbda": ("loss.off_policy_fraction", "it is the fraction of off-policy steps, the complement of TRL's "
                   "GKD lmbda (the on-policy fraction), so the old name read the opposite way"),
}


def _build(cls: type, data: dict[str, Any], prefix: str = "") -> Any:
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in data.items():
        dotted = f"{prefix}.{key}" if prefix else key
        if dotted in RENAMED_KEYS:
            new, why = RENAMED_KEYS[dotted]
            raise ValueError(f"config key {dotted!r} was renamed to {new!r} (same value): {why}")
        if key not in names:
            raise ValueError(f"unknown config key {dotted!r}; allowed in [{prefix or 'top level'}]: {sorted(names)}")
        kwargs[key] = _convert(value, hints[key], dotted)
    return cls(**kwargs)


def config_from_dict(data: dict[str, Any]) -> RunConfig:
    """Build and validate a ``RunConfig`` from nested dicts (the parsed TOML)."""
    config = _build(RunConfig, data)
    validate_config(config)
    return config


def config_to_dict(config: RunConfig) -> dict[str, Any]:
    """Nested plain dicts (JSON/TOML serializable); ``None`` sections are dropped."""

    def strip(x: Any) -> Any:
        if isinstance(x, dict):
            return {k: strip(v) for k, v in x.items() if v is not None}
        if isinstance(x, list):
            return [strip(v) for v in x]
        return x

    return strip(dataclasses.asdict(config))


def complete_config_dict(data: dict[str, Any]) -> dict[str, Any]:
    """A saved config with every key the current version has: keys added since it was written get their
    defaults (so resuming an older run does not see them as changed)."""
    return config_to_dict(_build(RunConfig, data))


def _parse_value(text: str) -> Any:
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text


def apply_overrides(data: dict[str, Any], overrides: Iterable[str]) -> dict[str, Any]:
    """Apply ``key.sub=value`` overrides onto the parsed TOML (values parsed as TOML literals)."""
    for item in overrides:
        if "=" not in item:
            raise ValueError(f"--set expects key=value, got {item!r}")
        key, text = item.split("=", 1)
        parts = key.strip().split(".")
        node = data
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ValueError(f"--set {key}: {part!r} is not a table")
        node[parts[-1]] = _parse_value(text.strip())
    return data


def load_config(path: str | Path, overrides: Iterable[str] = ()) -> RunConfig:
    """Read a TOML config, apply overrides, resolve relative model/data paths against its directory."""
    path = Path(path)
    try:
        data = tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as exc:
        raise ValueError(f"config {path}: invalid TOML: {exc}") from exc
    config = config_from_dict(apply_overrides(data, overrides))
    base = path.resolve().parent

    def resolve(p: str) -> str:
        return p if not p or Path(p).is_absolute() else str(base / p)

    config.student.path = resolve_model_path(config.student.path, base)
    for teacher in config.teachers.values():
        teacher.path = resolve_model_path(teacher.path, base)
    config.data.prompts = resolve(config.data.prompts)
    config.data.eval_prompts = resolve(config.data.eval_prompts)
    config.run.out_dir = resolve(config.run.out_dir)
    for domain, spec in config.loss.verifiers.items():
        config.loss.verifiers[domain] = resolve_code_spec(spec, base)
    if is_code_spec(config.data.task):
        config.data.task = resolve_code_spec(config.data.task, base)
    for domain, model_dir in config.loss.reward_models.items():
        config.loss.reward_models[domain] = resolve_model_path(model_dir, base)
    return config


def resolve_model_path(path: str, base: Path) -> str:
    """A relative model path that exists under ``base`` (the config's directory) becomes absolute; one that
    does not, but is shaped like a Hub id (``org/name``), stays as written: a model id for the HF cache."""
    if not path or Path(path).is_absolute():
        return path
    candidate = base / path
    return path if not candidate.exists() and is_model_id(path) else str(candidate)


def resolve_code_spec(spec: str, base: Path) -> str:
    """A verifier's or task's ``file.py:attr`` relative to the config's directory, or ``module:attr`` whose
    ``module.py`` lies there, becomes an absolute ``/dir/file.py:attr``; any other spec stays an importable
    module name."""
    module, _, func = spec.rpartition(":")
    if module.endswith(".py"):
        return f"{module if Path(module).is_absolute() else base / module}:{func}"
    candidate = base / (module.replace(".", "/") + ".py")
    return f"{candidate}:{func}" if candidate.is_file() else spec


def uses_importance_weights(c: RunConfig) -> bool:
    """Async mode with a sampled-token term to weight (the only terms importance weights apply to)."""
    sampled_terms = (c.loss.kd_weight > 0 and c.loss.signal == "sampled") or c.loss.verifier_weight > 0
    return c.run.max_staleness >= 1 and c.run.importance_clip > 0 and sampled_terms


def _require(ok: bool, key: str, message: str, value: Any) -> None:
    if not ok:
        raise ValueError(f"config key {key!r} {message}, got {value!r}")


def _choice(key: str, value: str, options: tuple[str, ...]) -> None:
    _require(value in options, key, f"must be one of {options}", value)


def _validate_correction(c: RunConfig) -> None:
    """Corrected rollouts feed the loss states the student reached partly on teacher tokens. Full-vocabulary
    and top-k terms are exact expectations at each state, so they stay valid (in async mode too: teachers are
    frozen and the schedule is the rollout's own step); sampled-token estimators assume the student drew
    every token, so they are refused."""
    k = c.rollout.correction
    _require(k.topk >= 0, "rollout.correction.topk", "must be >= 0 (0 = no rank rule)", k.topk)
    _require(0 <= k.min_prob <= 1, "rollout.correction.min_prob", "must be in [0, 1] (0 = no threshold)", k.min_prob)
    _require(k.topk > 0 or k.min_prob > 0, "rollout.correction", "rejects nothing with topk = 0 and min_prob = 0; "
             "set one of them or remove the section", k)
    _require(0 <= k.rate <= 1, "rollout.correction.rate", "must be in [0, 1]", k.rate)
    _require(k.decay_steps >= 0, "rollout.correction.decay_steps", "must be >= 0 (0 = constant rate)", k.decay_steps)
    _require(c.loss.signal != "sampled" or c.loss.kd_weight == 0, "rollout.correction",
             "cannot be used with loss.signal = 'sampled': its single-sample estimate assumes the student drew "
             "each token, and corrected tokens are the teacher's (loss.signal)", c.loss.signal)
    _require(c.loss.verifier_weight == 0, "rollout.correction",
             "cannot be used with loss.verifier_weight > 0: the policy-gradient term is an on-policy estimator "
             "and corrected completions are partly the teacher's (loss.verifier_weight)", c.loss.verifier_weight)


def validate_config(c: RunConfig) -> None:
    """Check value ranges and cross-field rules; every error names the dotted key."""
    _choice("run.dtype", c.run.dtype, DTYPES)
    _choice("student.dtype", c.student.dtype, ("", *DTYPES))
    _require(c.run.threads >= 0, "run.threads", "must be >= 0 (0 = torch default)", c.run.threads)
    _choice("run.pipeline", c.run.pipeline, ("serial", "strict"))
    _choice("run.parallel", c.run.parallel, PARALLEL)
    _require(c.run.max_staleness >= 0, "run.max_staleness", "must be >= 0 (0 = on-policy)", c.run.max_staleness)
    _require(c.run.importance_clip >= 0, "run.importance_clip", "must be >= 0 (0 = off)", c.run.importance_clip)
    if uses_importance_weights(c):
        r = c.rollout
        _require(r.temperature > 0 and r.top_k == 0 and r.top_p == 1, "run.importance_clip",
                 "needs plain sampling (rollout.temperature > 0, top_k = 0, top_p = 1), where the sampler's "
                 "recorded log-probs are the model's own; set run.importance_clip = 0 to train unweighted",
                 c.run.importance_clip)
    _require(bool(c.student.path), "student.path", "must name a model directory or a model id", c.student.path)
    _require(bool(c.teachers), "teachers", "must configure at least one teacher ([teachers.NAME])", c.teachers)
    for name, t in c.teachers.items():
        _require(bool(t.path), f"teachers.{name}.path", "must name a model directory or a model id", t.path)
        _require(t.weight > 0, f"teachers.{name}.weight", "must be > 0", t.weight)
        _require(t.temperature is None or t.temperature > 0, f"teachers.{name}.temperature", "must be > 0",
                 t.temperature)
        _choice(f"teachers.{name}.dtype", t.dtype, ("", *DTYPES))
    d = c.data
    _require(bool(d.prompts) != bool(d.task), "data.prompts", "xor data.task must be set (exactly one)",
             (d.prompts, d.task))
    _require(d.prompts_per_step >= 1, "data.prompts_per_step", "must be >= 1", d.prompts_per_step)
    _require(d.group_size >= 1, "data.group_size", "must be >= 1", d.group_size)
    _require(d.num_prompts >= 1, "data.num_prompts", "must be >= 1", d.num_prompts)
    _choice("data.sampler", d.sampler, ("adaptive", "uniform"))
    _choice("data.format", d.format, FORMATS)
    for name, column in d.columns.items():
        _choice(f"data.columns.{name}", name, FIELDS)
        _require(bool(column), f"data.columns.{name}", "must name a column", column)
    _require(0 < d.sampler_min_weight <= 1, "data.sampler_min_weight", "must be in (0, 1]", d.sampler_min_weight)
    _require(0 <= d.sampler_ema < 1, "data.sampler_ema", "must be in [0, 1)", d.sampler_ema)
    for dom, w in d.mixture.items():
        _require(w >= 0, f"data.mixture.{dom}", "must be >= 0", w)
    r = c.rollout
    _require(r.max_new_tokens >= 1, "rollout.max_new_tokens", "must be >= 1", r.max_new_tokens)
    _require(r.temperature >= 0, "rollout.temperature", "must be >= 0 (0 = greedy)", r.temperature)
    _require(0 < r.top_p <= 1, "rollout.top_p", "must be in (0, 1]", r.top_p)
    _require(0 <= r.handoff_fraction <= 1, "rollout.handoff_fraction", "must be in [0, 1] (0 = off)",
             r.handoff_fraction)
    _require(r.top_k >= 0, "rollout.top_k", "must be >= 0 (0 = off)", r.top_k)
    _require(r.micro_batch_size >= 1, "rollout.micro_batch_size", "must be >= 1", r.micro_batch_size)
    _choice("rollout.decode", r.decode, DECODE_MODES)
    if r.correction is not None:
        _validate_correction(c)
    lo = c.loss
    _choice("loss.divergence", lo.divergence, DIVERGENCES)
    _choice("loss.signal", lo.signal, SIGNALS)
    _choice("loss.off_policy_source", lo.off_policy_source, ("dataset", "teacher"))
    _require(0 <= lo.beta <= 1, "loss.beta", "must be in [0, 1]", lo.beta)
    _require(lo.temperature > 0, "loss.temperature", "must be > 0", lo.temperature)
    _require(lo.topk >= 1, "loss.topk", "must be >= 1", lo.topk)
    _require(0 <= lo.off_policy_fraction <= 1, "loss.off_policy_fraction", "must be in [0, 1]",
             lo.off_policy_fraction)
    _require(lo.kd_weight >= 0, "loss.kd_weight", "must be >= 0", lo.kd_weight)
    _require(lo.sft_weight >= 0, "loss.sft_weight", "must be >= 0", lo.sft_weight)
    _require(lo.verifier_weight >= 0, "loss.verifier_weight", "must be >= 0", lo.verifier_weight)
    _require(lo.kd_weight + lo.sft_weight + lo.verifier_weight > 0, "loss.kd_weight",
             "+ loss.sft_weight + loss.verifier_weight must be > 0 (nothing to learn)", lo.kd_weight)
    _choice("loss.backend", lo.backend, BACKEND_NAMES)
    for dom, spec in lo.verifiers.items():
        _require(":" in spec, f"loss.verifiers.{dom}", "must be 'module:function' or 'file.py:function'", spec)
    if lo.reward_models:
        _require(lo.verifier_weight > 0, "loss.reward_models",
                 "is set but loss.verifier_weight is 0, so its rewards would never be used", lo.reward_models)
    both = sorted(set(lo.verifiers) & set(lo.reward_models))
    _require(not both, "loss.reward_models", "and loss.verifiers both score domain(s) (pick one per domain)", both)
    o = c.optim
    _require(o.steps >= 1, "optim.steps", "must be >= 1", o.steps)
    _require(o.lr > 0, "optim.lr", "must be > 0", o.lr)
    _require(o.weight_decay >= 0, "optim.weight_decay", "must be >= 0", o.weight_decay)
    _require(len(o.betas) == 2 and all(0 <= b < 1 for b in o.betas), "optim.betas", "must be two numbers in [0, 1)",
             o.betas)
    _require(0 <= o.warmup_steps <= o.steps, "optim.warmup_steps", f"must be in [0, optim.steps={o.steps}]",
             o.warmup_steps)
    _require(0 <= o.min_lr_ratio <= 1, "optim.min_lr_ratio", "must be in [0, 1]", o.min_lr_ratio)
    _choice("optim.schedule", o.schedule, SCHEDULES)
    _require(o.grad_clip >= 0, "optim.grad_clip", "must be >= 0 (0 = off)", o.grad_clip)
    _require(o.max_consecutive_skips >= 1, "optim.max_consecutive_skips", "must be >= 1", o.max_consecutive_skips)
    _require(c.checkpoint.every >= 0, "checkpoint.every", "must be >= 0 (0 = only at the end)", c.checkpoint.every)
    _require(c.checkpoint.keep >= 1, "checkpoint.keep", "must be >= 1", c.checkpoint.keep)
    m = c.metrics
    _choice("metrics.wandb_mode", m.wandb_mode, ("", "online", "offline", "disabled"))
    _require(m.samples_every >= 0, "metrics.samples_every", "must be >= 0 (0 = never)", m.samples_every)
    _require(m.samples_per_step >= 1, "metrics.samples_per_step", "must be >= 1", m.samples_per_step)
    _require(c.eval.every >= 0, "eval.every", "must be >= 0", c.eval.every)
    _require(c.eval.num_prompts >= 1, "eval.num_prompts", "must be >= 1", c.eval.num_prompts)
    if c.student.lora is not None:
        _require(c.student.lora.r >= 1, "student.lora.r", "must be >= 1", c.student.lora.r)
