"""The trainer's one configuration object: a dataclass, overridable from a YAML/JSON file and the command line.

Precedence: dataclass defaults < ``--config file.yaml`` < explicit command-line flags.
Every field is documented in ``docs/trainer.md``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
from dataclasses import dataclass, field
from typing import Optional, get_origin

__all__ = ["TrainConfig", "ConfigError", "check_loss_kwargs", "load_config_file", "parse_args"]

PRECISIONS = ("auto", "bf16", "fp32")
ATTN_IMPLEMENTATIONS = ("auto", "flash_attention_2", "sdpa", "eager")
FORMATS = ("auto", "messages", "prompt_completion", "problem_solution")
ON_SAVE_ERROR = ("stop", "continue")
ON_NONFINITE = ("skip", "stop")


class ConfigError(ValueError):
    """A bad configuration value; the message names the option."""


# Loss options the trainer sets itself (objective, kl_coef, kl: its own options; the labels it builds use -100).
TRAINER_LOSS_OPTIONS = ("objective", "ignore_index", "kl_coef", "kl")
KL_DIRECTIONS = ("forward", "reverse")


def check_loss_kwargs(loss_kwargs: dict, objective="dft", anchor: Optional[dict] = None) -> dict:
    """``loss_kwargs`` as the trainer passes them to ``dk.patch``: the options ``dk.patch`` takes, less
    :data:`TRAINER_LOSS_OPTIONS`, with values checked for ``objective`` together with ``anchor`` (the
    ``kl_coef``/``kl`` the trainer adds).  Raises :class:`ConfigError`."""
    from ..hf import check_loss_kwargs as check_patch_kwargs

    for key in TRAINER_LOSS_OPTIONS:
        if isinstance(loss_kwargs, dict) and key in loss_kwargs:
            hint = f" (use --{key.replace('_', '-')})" if key in ("kl_coef", "kl") else ""
            raise ConfigError(f"loss_kwargs: must not set {key!r} (the trainer owns it){hint}")
    try:
        checked = check_patch_kwargs(dict(loss_kwargs, **(anchor or {})) if isinstance(loss_kwargs, dict)
                                     else loss_kwargs, objective)
    except (TypeError, ValueError) as e:
        raise ConfigError(f"loss_kwargs: {e}") from None
    for key in anchor or {}:
        checked.pop(key)
    return checked


def _opt(default=dataclasses.MISSING, help: str = "", *, factory=dataclasses.MISSING):
    """A config field whose help text is shown by ``dft-train --help``."""
    return field(default=default, default_factory=factory, metadata={"help": help})


@dataclass
class TrainConfig:
    """Every option of ``dft-train``; each field is a flag, and a key of a ``--config`` file."""

    # --- model and tokenizer
    model: str = _opt("tiny", "local HF model dir, or tiny (random Qwen2) / tiny-llama (random Llama)")
    tokenizer: Optional[str] = _opt(None, "tokenizer dir; default: the model dir (tiny: the demo tokenizer)")
    chat_template: Optional[str] = _opt(None, "jinja file or template string, overrides the tokenizer's")
    system_prompt: Optional[str] = _opt(None, "prepended as a system turn to conversations without one")
    attn_implementation: str = _opt("auto", f"one of {ATTN_IMPLEMENTATIONS}; auto = flash_attention_2 on CUDA "
                                            "if flash-attn is installed, else sdpa")
    gradient_checkpointing: bool = _opt(False, "HF gradient checkpointing (non-reentrant)")
    use_liger: bool = _opt(True, "Liger's RoPE/RMSNorm/SwiGLU kernels on CUDA when liger-kernel is installed "
                                 "(the loss stays dft_kernels')")
    tiny_hidden_size: int = _opt(128, "hidden size of the tiny models")
    tiny_num_layers: int = _opt(4, "layers of the tiny models")
    tiny_num_heads: int = _opt(4, "attention heads of the tiny models")
    tiny_num_kv_heads: int = _opt(2, "key/value heads of the tiny models")
    tiny_intermediate_size: int = _opt(384, "MLP size of the tiny models")
    # --- loss
    objective: str = _opt("dft", "ce (SFT), dft, power, focal, chord, prob or entropy (docs/objectives.md)")
    objective_args: dict = _opt(factory=dict, help='objective parameters as JSON, e.g. \'{"min_weight": 0.1}\'')
    loss_kwargs: dict = _opt(factory=dict, help="extra dk.patch options as JSON: ignore_index, reduction, "
                                                "label_smoothing, z_loss, backend, chunk_size, accum_dtype, validate")
    kl_coef: float = _opt(0.0, "the anchor (ASFT): each token's loss plus kl_coef * KL to a frozen reference "
                               "model (0: off; LLaMA-Factory's asft_alpha is 0.1)")
    kl: str = _opt("forward", f"one of {KL_DIRECTIONS}: KL(ref || model) (ASFT's) or KL(model || ref); with kl_coef")
    ref_model: Optional[str] = _opt(None, "local HF model dir of the reference; default: a frozen copy of the "
                                          "initial model (with kl_coef > 0)")
    log_stats: bool = _opt(True, "per-step NLL / mean prob / accuracy / entropy (one no-grad head pass)")
    # --- data
    train_file: Optional[str] = _opt(None, "training data: .jsonl, .json or .parquet (required to train)")
    eval_file: Optional[str] = _opt(None, "held-out set for generation + exact match")
    data_format: str = _opt("auto", f"one of {FORMATS}; auto detects it from the fields")
    max_length: int = _opt(2048, "truncation length, and the row length when packing")
    packing: bool = _opt(False, "pack several examples per row")
    num_proc: int = _opt(1, "processes for tokenisation (datasets.map)")
    # --- optimisation (DFT paper defaults)
    lr: float = _opt(5e-5, "peak learning rate")
    weight_decay: float = _opt(0.01, "AdamW weight decay (not on biases and norm weights)")
    adam_beta1: float = _opt(0.9, "AdamW beta1")
    adam_beta2: float = _opt(0.95, "AdamW beta2")
    adam_eps: float = _opt(1e-8, "AdamW epsilon")
    lr_scheduler: str = _opt("cosine", "any transformers.get_scheduler name")
    warmup_ratio: float = _opt(0.1, "linear warmup over this fraction of the steps, in [0, 1)")
    max_grad_norm: float = _opt(1.0, "gradient clipping norm (0 disables clipping)")
    per_device_batch_size: int = _opt(4, "rows per micro-batch per rank")
    grad_accum_steps: int = _opt(1, "micro-batches per optimizer step")
    num_epochs: int = _opt(1, "epochs, when max_steps is -1")
    max_steps: int = _opt(-1, "optimizer steps (the data cycles through epochs); > 0 overrides num_epochs")
    seed: int = _opt(42, "data order, tiny-model init, torch RNG")
    precision: str = _opt("auto", f"one of {PRECISIONS}; auto = bf16 autocast on a bf16-capable GPU, fp32 "
                                  "otherwise")
    fsdp: bool = _opt(False, "FSDP2 (fully_shard) instead of DDP under torchrun")
    # --- output, logging, checkpoints
    output_dir: str = _opt("runs/dft-train", "metrics, plot and checkpoints go here")
    logging_steps: int = _opt(1, "write metrics.jsonl every N optimizer steps")
    progress_bar: bool = _opt(True, "tqdm progress bar")
    plot: bool = _opt(True, "write curves.png at the end")
    tensorboard: bool = _opt(False, "TensorBoard events in output_dir/tensorboard")
    save_steps: int = _opt(0, "checkpoint every N steps (0 = only at the end and on SIGTERM/SIGINT)")
    save_total_limit: int = _opt(2, "keep the newest N checkpoints (0 = keep all)")
    save_final: bool = _opt(True, "checkpoint at the end")
    resume: Optional[str] = _opt(None, "a checkpoint dir, latest (newest in output_dir) or auto (newest that verifies)")
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
    eval_steps: int = _opt(0, "evaluate every N steps (0 = only at the end)")
    eval_max_new_tokens: int = _opt(512, "generation length for evaluation")
    eval_batch_size: int = _opt(16, "generation batch size for evaluation")
    eval_limit: int = _opt(0, "evaluate the first N held-out examples (0 = all)")

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
        need(isinstance(self.kl_coef, (int, float)) and not isinstance(self.kl_coef, bool)
             and math.isfinite(self.kl_coef) and self.kl_coef >= 0, "kl_coef", "must be a finite number >= 0")
        need(self.kl in KL_DIRECTIONS, "kl", f"expected one of {KL_DIRECTIONS}")
        need(self.ref_model is None or self.kl_coef > 0, "ref_model",
             "is the reference of the anchor and needs kl_coef > 0")
        need(self.ref_model is None or (isinstance(self.ref_model, str) and self.ref_model != ""), "ref_model",
             "must be a local model directory")
        need(isinstance(self.objective_args, dict), "objective_args", "must be a mapping")
        need(isinstance(self.loss_kwargs, dict), "loss_kwargs", "must be a mapping")
        check_loss_kwargs(self.loss_kwargs, self.make_objective(), self.anchor_kwargs())

    def anchor_kwargs(self) -> dict:
        """The anchor's loss options for ``dk.patch``: none at ``kl_coef == 0`` (the plain loss, unchanged)."""
        return {"kl_coef": float(self.kl_coef), "kl": self.kl} if self.kl_coef > 0 else {}


    def make_objective(self):
        """The dk objective object named by ``objective`` with ``objective_args``."""
        from ..objectives import OBJECTIVES

        cls = OBJECTIVES.get(str(self.objective).lower())
        if cls is None:
            raise ConfigError(f"objective: unknown objective {self.objective!r}; expected one of {sorted(OBJECTIVES)}")
        try:
            return cls(**self.objective_args)
        except (TypeError, ValueError) as e:
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


def _json_mapping(text: str) -> dict:
    """argparse ``type=`` of the dict fields: a JSON object."""
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        raise argparse.ArgumentTypeError(f"expected a JSON object such as '{{\"min_weight\": 0.1}}': {e}")
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError("expected a JSON object")
    return value


def build_arg_parser() -> argparse.ArgumentParser:
    """``dft-train``'s parser: one flag per TrainConfig field, with its help text and default
    (transformers.HfArgumentParser), booleans as ``--flag``/``--no-flag``, dicts as JSON."""
    from transformers import HfArgumentParser

    class ConfigParser(HfArgumentParser):
        @staticmethod
        def _parse_dataclass_field(parser, f: dataclasses.Field):
            help_text = f.metadata.get("help")
            if f.type is bool:
                parser.add_argument(f"--{f.name}", action=argparse.BooleanOptionalAction, default=f.default,
                                    help=help_text)
            elif f.type is dict or get_origin(f.type) is dict:
                parser.add_argument(f"--{f.name}", type=_json_mapping, default=f.default_factory(), metavar="JSON",
                                    help=help_text)
            else:
                HfArgumentParser._parse_dataclass_field(parser, f)

        def error(self, message):
            # one line naming the option, like a ConfigError; argparse would print the usage first,
            # and dft-train's usage is forty lines long
            self.exit(2, f"{self.prog}: error: {message} (dft-train --help lists the options)\n")

    p = ConfigParser(TrainConfig, prog="dft-train",
                     description="Thin SFT/DFT trainer on top of dft_kernels (docs/trainer.md). "
                                 "Precedence: defaults < --config file < flags.")
    p.add_argument("--config", default=None, help="YAML or JSON file of options (its keys are the flag names)")
    p.add_argument("--demo", action="store_true", help="run the embedded SFT-vs-DFT demo and exit")
    return p


def parse_args(argv: Optional[list] = None) -> tuple[TrainConfig, dict]:
    """Command line -> (TrainConfig, extra flags such as ``demo``).  A ``--config`` file's values
    become the parser's defaults, so explicit flags override them."""
    parser = build_arg_parser()
    known, _ = parser.parse_known_args(argv)
    source = "command line"
    if known.config:
        values = load_config_file(known.config)
        unknown = sorted(set(values) - {f.name for f in dataclasses.fields(TrainConfig)})
        if unknown:
            raise ConfigError(f"{known.config}: unknown option(s) {unknown}; see dft-train --help")
        parser.set_defaults(**values)
        source = f"{known.config} and the command line"
    ns = vars(parser.parse_args(argv))
    extra = {"demo": ns.pop("demo")}
    ns.pop("config")
    return TrainConfig.from_dict(ns, source=source), extra
