"""The trainer's one configuration object: a dataclass, overridable from a YAML/JSON file and the command line.

Precedence: dataclass defaults < ``--config file.yaml`` < explicit command-line flags.
Every field is documented in ``docs/trainer.md``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
from dataclasses import dataclass, field
from typing import Any, Optional, Union, get_args, get_origin, get_type_hints

__all__ = ["TrainConfig", "ConfigError", "check_loss_kwargs", "load_config_file", "parse_args"]

PRECISIONS = ("auto", "bf16", "fp32")
ATTN_IMPLEMENTATIONS = ("auto", "flash_attention_2", "sdpa", "eager")
FORMATS = ("auto", "messages", "prompt_completion", "problem_solution")
ON_SAVE_ERROR = ("stop", "continue")
ON_NONFINITE = ("skip", "stop")


class ConfigError(ValueError):
    """A bad configuration value; the message names the option."""


# Loss options the trainer sets itself (objective: its own option; the labels it builds use -100).
TRAINER_LOSS_OPTIONS = ("objective", "ignore_index")


def check_loss_kwargs(loss_kwargs: dict, objective="dft") -> dict:
    """``loss_kwargs`` as the trainer passes them to ``dk.patch``: the options ``dk.patch`` takes, less
    :data:`TRAINER_LOSS_OPTIONS`, with values checked for ``objective``.  Raises :class:`ConfigError`."""
    from ..hf import check_loss_kwargs as check_patch_kwargs

    for key in TRAINER_LOSS_OPTIONS:
        if isinstance(loss_kwargs, dict) and key in loss_kwargs:
            raise ConfigError(f"loss_kwargs: must not set {key!r} (the trainer owns it)")
    try:
        return check_patch_kwargs(loss_kwargs, objective)
    except (TypeError, ValueError) as e:
        raise ConfigError(f"loss_kwargs: {e}") from None


@dataclass
class TrainConfig:
    # --- model and tokenizer
    model: str = "tiny"                       # local HF model dir, or "tiny" (Qwen2) / "tiny-llama" (random init)
    tokenizer: Optional[str] = None           # tokenizer dir; default: the model dir (tiny: the demo tokenizer)
    chat_template: Optional[str] = None       # jinja file or template string, overrides the tokenizer's
    system_prompt: Optional[str] = None       # prepended as a system turn to formats without one
    attn_implementation: str = "auto"         # auto = flash_attention_2 if flash-attn is installed, else sdpa
    gradient_checkpointing: bool = False
    use_liger: bool = True                    # Liger's RoPE/RMSNorm/SwiGLU kernels on GPU when installed
    tiny_hidden_size: int = 128
    tiny_num_layers: int = 4
    tiny_num_heads: int = 4
    tiny_num_kv_heads: int = 2
    tiny_intermediate_size: int = 384
    # --- loss
    objective: str = "dft"                    # any dk objective name: ce, dft, power, focal, chord, prob, entropy
    objective_args: dict = field(default_factory=dict)   # e.g. {"min_weight": 0.1} for dft
    loss_kwargs: dict = field(default_factory=dict)      # extra dk.patch kwargs, e.g. {"z_loss": 1e-4}
    log_stats: bool = True                    # per-step NLL / mean prob / accuracy / entropy (one no-grad head pass)
    # --- data
    train_file: Optional[str] = None          # .jsonl / .json / .parquet
    eval_file: Optional[str] = None           # held-out set for generation + exact match
    data_format: str = "auto"                 # auto | messages | prompt_completion | problem_solution
    max_length: int = 2048
    packing: bool = False
    num_proc: int = 1                         # processes for tokenisation (datasets.map)
    # --- optimisation (DFT paper defaults)
    lr: float = 5e-5
    weight_decay: float = 0.01
    adam_beta1: float = 0.9
    adam_beta2: float = 0.95
    adam_eps: float = 1e-8
    lr_scheduler: str = "cosine"              # any transformers.get_scheduler name
    warmup_ratio: float = 0.1
    max_grad_norm: float = 1.0
    per_device_batch_size: int = 4
    grad_accum_steps: int = 1
    num_epochs: int = 1
    max_steps: int = -1                       # > 0 overrides num_epochs (the data cycles through epochs)
    seed: int = 42
    precision: str = "auto"                   # auto = bf16 autocast on a bf16-capable GPU, fp32 otherwise
    fsdp: bool = False                        # FSDP2 (fully_shard) instead of DDP under torchrun
    # --- output, logging, checkpoints
    output_dir: str = "runs/dft-train"
    logging_steps: int = 1                    # write metrics.jsonl every N optimizer steps
    progress_bar: bool = True
    plot: bool = True
    tensorboard: bool = False
    save_steps: int = 0                       # 0 = checkpoint only at the end (and on SIGTERM/SIGINT)
    save_total_limit: int = 2                 # keep the newest N checkpoints (0 = keep all)
    save_final: bool = True
    resume: Optional[str] = None              # checkpoint dir, "latest" (newest in output_dir) or "auto" (newest valid)
    force_resume: bool = field(default=False, metadata={"help": (
        "resume even when the config or the train file changed since the checkpoint (the changes are "
        "printed instead of refused)")})
    on_save_error: str = field(default="stop", metadata={"help": (
        "when a periodic checkpoint cannot be written (disk full, I/O error): 'stop' the run with an error, "
        "or 'continue' training and try again at the next save; earlier checkpoints stay intact either way")})
    on_nonfinite: str = field(default="stop", metadata={"help": (
        "when a step's loss or gradient norm is NaN/inf: 'skip' the update (counted as nonfinite_steps in "
        "the metrics) or 'stop' with a checkpoint of the last good step and an error naming the step and batch")})
    # --- evaluation
    eval_steps: int = 0                       # 0 = evaluate only at the end
    eval_max_new_tokens: int = 512
    eval_batch_size: int = 16
    eval_limit: int = 0                       # evaluate the first N held-out examples (0 = all)

    def __post_init__(self):
        self.validate()

    def validate(self) -> None:
        def need(cond: bool, name: str, msg: str):
            if not cond:
                raise ConfigError(f"{name}: {msg}, got {getattr(self, name)!r}")

        need(self.precision in PRECISIONS, "precision", f"expected one of {PRECISIONS}")
        need(self.attn_implementation in ATTN_IMPLEMENTATIONS, "attn_implementation",
             f"expected one of {ATTN_IMPLEMENTATIONS}")
        need(self.data_format in FORMATS, "data_format", f"expected one of {FORMATS}")
        need(self.on_save_error in ON_SAVE_ERROR, "on_save_error", f"expected one of {ON_SAVE_ERROR}")
        need(self.on_nonfinite in ON_NONFINITE, "on_nonfinite", f"expected one of {ON_NONFINITE}")
        for name in ("max_length", "per_device_batch_size", "grad_accum_steps", "logging_steps", "eval_batch_size",
                     "num_proc", "tiny_hidden_size", "tiny_num_layers", "tiny_num_heads", "tiny_num_kv_heads",
                     "tiny_intermediate_size", "eval_max_new_tokens"):
            need(isinstance(getattr(self, name), int) and getattr(self, name) >= 1, name, "must be an int >= 1")
        for name in ("save_steps", "save_total_limit", "eval_steps", "eval_limit", "num_epochs"):
            need(isinstance(getattr(self, name), int) and getattr(self, name) >= 0, name, "must be an int >= 0")
        need(self.max_length >= 2, "max_length", "must be >= 2")
        need(self.max_steps == -1 or self.max_steps >= 1, "max_steps", "must be -1 (use num_epochs) or >= 1")
        need(self.max_steps > 0 or self.num_epochs >= 1, "num_epochs", "must be >= 1 when max_steps is -1")
        need(self.lr > 0, "lr", "must be > 0")
        need(0.0 <= self.warmup_ratio < 1.0, "warmup_ratio", "must be in [0, 1)")
        need(self.max_grad_norm >= 0, "max_grad_norm", "must be >= 0 (0 disables clipping)")
        need(0.0 <= self.adam_beta1 < 1.0 and 0.0 <= self.adam_beta2 < 1.0, "adam_beta1",
             "betas must be in [0, 1)")
        need(self.tiny_hidden_size % self.tiny_num_heads == 0, "tiny_hidden_size",
             f"must be divisible by tiny_num_heads={self.tiny_num_heads}")
        need(self.tiny_num_heads % self.tiny_num_kv_heads == 0, "tiny_num_kv_heads",
             f"must divide tiny_num_heads={self.tiny_num_heads}")
        need(isinstance(self.objective_args, dict), "objective_args", "must be a mapping")
        need(isinstance(self.loss_kwargs, dict), "loss_kwargs", "must be a mapping")
        check_loss_kwargs(self.loss_kwargs, self.make_objective())


    def make_objective(self):
        """The dk objective object named by ``objective`` with ``objective_args``."""
        from ..objectives import OBJECTIVES

        cls = OBJECTIVES.get(str(self.objective).lower())
        if cls is None:
            raise ConfigError(f"objective: unknown objective {self.objective!r}; expected one of {sorted(OBJECTIVES)}")
        try:
            return cls(**self.objective_args)
        except TypeError as e:
            raise ConfigError(f"objective_args: {self.objective_args!r} do not fit objective "
                              f"{self.objective!r}: {e}") from None

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict, *, source: str = "config") -> "TrainConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ConfigError(f"{source}: unknown option(s) {unknown}; see docs/trainer.md for the list")
        return cls(**values)

    @classmethod
    def from_file(cls, path: str, **overrides) -> "TrainConfig":
        values = load_config_file(path)
        values.update(overrides)
        return cls.from_dict(values, source=path)


def load_config_file(path: str) -> dict:
    """Read a YAML (.yaml/.yml) or JSON (.json) mapping of option -> value."""
    if not os.path.isfile(path):
        raise ConfigError(f"config: file not found: {path}")
    with open(path, encoding="utf-8") as f:
        text = f.read()
    if path.endswith((".yaml", ".yml")):
        import yaml

        try:
            values = yaml.safe_load(text)
        except yaml.YAMLError as e:
            mark = getattr(e, "problem_mark", None)
            where = f"{path}:{mark.line + 1}" if mark is not None else path
            raise ConfigError(f"{where}: invalid YAML: {e}") from None
    elif path.endswith(".json"):
        try:
            values = json.loads(text)
        except json.JSONDecodeError as e:
            raise ConfigError(f"{path}:{e.lineno}: invalid JSON: {e.msg}") from None
    else:
        raise ConfigError(f"config: {path} must end in .yaml, .yml or .json")
    if values is None:
        values = {}
    if not isinstance(values, dict):
        raise ConfigError(f"{path}: the config file must hold a mapping of option: value")
    return values


def _field_parser(tp):
    """argparse ``type=`` for a dataclass field type."""
    origin = get_origin(tp)
    if origin is Union:  # Optional[X]
        inner = [a for a in get_args(tp) if a is not type(None)][0]
        base = _field_parser(inner)
        return lambda s: None if s.lower() in ("none", "null") else base(s)
    if tp is dict or origin is dict:
        def parse_mapping(s: str) -> dict:
            try:
                v = json.loads(s)
            except json.JSONDecodeError as e:
                raise argparse.ArgumentTypeError(f"expected a JSON object such as '{{\"min_weight\": 0.1}}': {e}")
            if not isinstance(v, dict):
                raise argparse.ArgumentTypeError("expected a JSON object")
            return v
        return parse_mapping
    return tp


def build_arg_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="dft-train",
        description="Thin SFT/DFT trainer on top of dft_kernels (see docs/trainer.md). "
                    "Precedence: defaults < --config file < flags.",
        argument_default=argparse.SUPPRESS)
    p.add_argument("--config", help="YAML or JSON file of options")
    p.add_argument("--demo", action="store_true", help="run the embedded SFT-vs-DFT demo and exit")
    hints = get_type_hints(TrainConfig)
    for f in dataclasses.fields(TrainConfig):
        tp = hints[f.name]
        flag = "--" + f.name
        if tp is bool:
            p.add_argument(flag, action=argparse.BooleanOptionalAction)
        else:
            p.add_argument(flag, type=_field_parser(tp), metavar=f.name.upper())
    return p


def parse_args(argv: Optional[list] = None) -> tuple[TrainConfig, dict]:
    """Command line -> (TrainConfig, extra flags such as ``demo``)."""
    ns = vars(build_arg_parser().parse_args(argv))
    extra = {"demo": ns.pop("demo", False)}
    path = ns.pop("config", None)
    values: dict[str, Any] = load_config_file(path) if path else {}
    values.update(ns)
    return TrainConfig.from_dict(values, source=path or "command line"), extra
