"""Model and tokenizer: a local HF directory or a random tiny Qwen2/Llama, attention backend,
Liger's non-loss kernels, gradient checkpointing, the dk.patch loss, and the per-batch stats probe."""

from __future__ import annotations

import copy
import importlib.util
import os
from typing import Optional

import torch

from .config import ConfigError, TrainConfig

__all__ = ["TINY_MODELS", "load_tokenizer", "build_model", "build_reference", "ReferenceModel",
           "choose_attn_implementation", "HeadStatsProbe", "packing_supported"]

TINY_MODELS = ("tiny", "tiny-llama")


def load_tokenizer(cfg: TrainConfig):

    from .data import resolve_chat_template
    from .demo_data import build_tokenizer

    path = cfg.tokenizer or (None if cfg.model in TINY_MODELS else cfg.model)
    if path is None:
        tok = build_tokenizer()  # the demo's character tokenizer, built locally
    else:
        if not os.path.isdir(path):
            raise ConfigError(f"tokenizer: {path!r} is not a local directory (dft-train never downloads)")
        tok = _load_saved_tokenizer(path)
    resolve_chat_template(tok, cfg.chat_template)
    if tok.pad_token_id is None:
        if tok.eos_token_id is None:
            raise ConfigError("tokenizer: it has neither a pad nor an eos token")
        tok.pad_token = tok.eos_token
    return tok


def _load_saved_tokenizer(path: str):
    """AutoTokenizer, except for a tokenizer saved as a plain tokenizers backend (the demo's): transformers
    5 would rebuild that as the model type's tokenizer class (e.g. Qwen2's byte-level pre-tokenizer
    when a qwen2 config.json sits next to it), changing the ids; load its tokenizer.json as is."""
    import json

    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    cfg_file = os.path.join(path, "tokenizer_config.json")
    if os.path.isfile(cfg_file) and os.path.isfile(os.path.join(path, "tokenizer.json")):
        with open(cfg_file, encoding="utf-8") as f:
            cls = json.load(f).get("tokenizer_class")
        if cls in ("TokenizersBackend", "PreTrainedTokenizerFast"):
            return PreTrainedTokenizerFast.from_pretrained(path, local_files_only=True)
    return AutoTokenizer.from_pretrained(path, local_files_only=True)


def choose_attn_implementation(requested: str, device: torch.device) -> str:
    if requested != "auto":
        if requested == "flash_attention_2" and importlib.util.find_spec("flash_attn") is None:
            raise ConfigError("attn_implementation: flash_attention_2 needs the flash-attn package "
                              "(pip install flash-attn); use sdpa otherwise")
        return requested
    if device.type == "cuda" and importlib.util.find_spec("flash_attn") is not None:
        return "flash_attention_2"
    return "sdpa"


def packing_supported(attn_implementation: str) -> Optional[str]:
    """None when packed rows are attended correctly, else the reason they are not."""
    if attn_implementation == "flash_attention_2":
        return None  # transformers runs the varlen kernel on position ids that restart
    try:
        from transformers.masking_utils import find_packed_sequence_indices  # noqa: F401
    except ImportError:
        return ("this transformers version does not build block-diagonal masks from position ids; "
                "install flash-attn (attn_implementation=flash_attention_2), upgrade transformers, "
                "or train without --packing")
    return None


def _tiny_config(cfg: TrainConfig, tokenizer):
    from transformers import LlamaConfig, Qwen2Config

    cls = Qwen2Config if cfg.model == "tiny" else LlamaConfig
    return cls(
        vocab_size=len(tokenizer), hidden_size=cfg.tiny_hidden_size, intermediate_size=cfg.tiny_intermediate_size,
        num_hidden_layers=cfg.tiny_num_layers, num_attention_heads=cfg.tiny_num_heads,
        num_key_value_heads=cfg.tiny_num_kv_heads, max_position_embeddings=max(cfg.max_length, 256),
        tie_word_embeddings=False, pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
        bos_token_id=tokenizer.bos_token_id, use_cache=False)


def build_model(cfg: TrainConfig, tokenizer, device: torch.device, model_path: Optional[str] = None):
    """``(model, attn_implementation, initial)``: the causal LM in float32 on ``device`` (bf16 comes from
    autocast), patched with dk.patch; ``initial``: with ``kl_coef > 0`` and no ``ref_model``, an unpatched
    copy of it before any step (the anchor's reference, :func:`build_reference`), else None.

    ``model_path`` (a checkpoint's model dir) overrides ``cfg.model`` when resuming.
    """
    attn = choose_attn_implementation(cfg.attn_implementation, device)
    model = _initial_model(cfg, tokenizer, attn, model_path)
    if len(tokenizer) > model.get_input_embeddings().weight.shape[0]:
        raise ConfigError(f"tokenizer: it has {len(tokenizer)} tokens but the model's embedding has "
                          f"{model.get_input_embeddings().weight.shape[0]} rows")
    model.config.use_cache = False
    if cfg.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.to(device)
    # the anchor's reference when it is the initial model: copied before the patch, so it is a plain model
    initial = copy.deepcopy(model) if cfg.kl_coef > 0 and cfg.ref_model is None and model_path is None else None
    patch_loss(model, cfg, liger=use_liger(cfg, model, device))
    return model, attn, initial


def _initial_model(cfg: TrainConfig, tokenizer, attn: str, model_path: Optional[str] = None):
    """``cfg.model`` as the run starts from it (a local dir, or the tiny model's seeded random init), or
    ``model_path``; float32 on the CPU, unpatched."""
    from transformers import AutoModelForCausalLM

    path = model_path or (None if cfg.model in TINY_MODELS else cfg.model)
    if path is None:
        torch.manual_seed(cfg.seed)  # the random init is part of the run's seed
        return AutoModelForCausalLM.from_config(_tiny_config(cfg, tokenizer), attn_implementation=attn,
                                                dtype=torch.float32)
    if not os.path.isdir(path):
        raise ConfigError(f"model: {path!r} is not a local model directory nor one of {TINY_MODELS} "
                          "(dft-train never downloads)")
    return AutoModelForCausalLM.from_pretrained(path, attn_implementation=attn, dtype=torch.float32,
                                                local_files_only=True)


class ReferenceModel:
    """The anchor's frozen reference (``kl_coef > 0``): an unpatched causal LM in eval mode whose parameters
    never require a gradient.  ``hidden_states`` runs its backbone under ``torch.no_grad`` on the batch the
    model trains on; the patched loss reads them with ``head`` (docs/trainer.md, "The anchor")."""

    def __init__(self, model, source: str):
        model.eval()
        model.requires_grad_(False)
        self.model, self.source = model, source
        self.head = model.get_output_embeddings()

    def hidden_states(self, input_ids: torch.Tensor, position_ids: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            out = self.model.get_decoder()(input_ids=input_ids, position_ids=position_ids, use_cache=False)
        return out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]

    def fingerprint(self) -> str:
        """sha256 of the parameters' names, dtypes, shapes and bytes: a resumed run checks that it has the
        reference the run started with."""
        import hashlib

        h = hashlib.sha256()
        for name, p in self.model.state_dict().items():
            t = p.detach().to("cpu").contiguous()
            h.update(f"{name}:{t.dtype}:{tuple(t.shape)};".encode())
            h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
        return h.hexdigest()


def build_reference(cfg: TrainConfig, tokenizer, device: torch.device, attn: str, model,
                    initial=None) -> Optional[ReferenceModel]:
    """The anchor's reference, or None at ``kl_coef == 0``: ``cfg.ref_model`` loaded from its directory;
    else the initial model: ``initial`` (:func:`build_model`'s copy) at the start of a run, or, when
    resuming (``model`` is then the checkpoint's), the initial model rebuilt as the run built it
    (``cfg.model`` loaded again, or the tiny model's init from ``cfg.seed``; the global RNG is left as it was)."""
    if not cfg.kl_coef > 0:
        return None
    if cfg.ref_model is not None:
        if not os.path.isdir(cfg.ref_model):
            raise ConfigError(f"ref_model: {cfg.ref_model!r} is not a local model directory (dft-train never "
                              "downloads)")
        from transformers import AutoModelForCausalLM

        ref, source = AutoModelForCausalLM.from_pretrained(cfg.ref_model, attn_implementation=attn,
                                                           dtype=torch.float32, local_files_only=True), cfg.ref_model
    elif initial is not None:
        ref, source = initial, "initial"
    else:
        rng = torch.get_rng_state()
        ref, source = _initial_model(cfg, tokenizer, attn), "initial"
        torch.set_rng_state(rng)
    ref.config.use_cache = False
    ref.to(device)
    reference = ReferenceModel(ref, source)
    v_ref, v = reference.head.weight.shape[0], model.get_output_embeddings().weight.shape[0]
    if v_ref != v:
        raise ConfigError(f"ref_model: the reference's LM head has {v_ref} rows (vocabulary) but the model's has {v}; "
                          "the anchor compares both distributions over the same vocabulary")
    return reference


def use_liger(cfg: TrainConfig, model, device: torch.device) -> bool:
    """Liger's RoPE/RMSNorm/SwiGLU kernels: on CUDA, when installed and the model type is supported."""
    if not (cfg.use_liger and device.type == "cuda" and importlib.util.find_spec("liger_kernel") is not None):
        return False
    from liger_kernel.transformers.monkey_patch import MODEL_TYPE_TO_APPLY_LIGER_FN

    return getattr(model.config, "model_type", None) in MODEL_TYPE_TO_APPLY_LIGER_FN


def patch_loss(model, cfg: TrainConfig, liger: bool = False) -> None:
    """The one source of truth of the training loss: dk.patch with the configured objective
    (which also applies Liger's non-loss kernels when ``liger``)."""
    from .. import hf

    hf.patch(model, objective=cfg.make_objective(), liger=liger, **cfg.loss_kwargs, **cfg.anchor_kwargs())


class HeadStatsProbe:
    """Per-batch NLL, mean target probability, accuracy and entropy of the model being trained.

    A forward hook on the decoder captures the final hidden states of the patched model's own
    forward and runs ``dk.linear_cross_entropy(..., return_stats=True)`` on them under
    ``no_grad`` (one forward-only pass over the head).  The hook runs inside the model's forward,
    so under FSDP the head weight is gathered at that moment.  The loss itself is never
    computed here: it comes from the patched model, so there is one source of truth for it.
    Sums over this rank's micro-batches accumulate in ``sums`` (no host sync).
    """

    KEYS = ("num_tokens", "nll", "mean_prob", "accuracy", "entropy")

    def __init__(self, model, softcap: Optional[float] = None):
        self.model = model
        self.softcap = softcap
        self.labels: Optional[torch.Tensor] = None
        self.sums: Optional[torch.Tensor] = None
        self._handle = model.get_decoder().register_forward_hook(self._hook)

    def remove(self) -> None:
        self._handle.remove()

    def reset(self, device) -> None:
        self.sums = torch.zeros(len(self.KEYS), dtype=torch.float64, device=device)

    def _hook(self, module, args, output):
        if self.labels is None:  # generation, or a forward the trainer did not announce
            return
        from ..functional import linear_cross_entropy
        from ..objectives import Entropy

        hidden = output[0] if isinstance(output, tuple) else output.last_hidden_state
        head = self.model.get_output_embeddings()
        with torch.no_grad():
            h = hidden.detach()
            w = head.weight.detach()
            if hasattr(w, "full_tensor"):  # an FSDP2 DTensor outside of its unshard window
                w = w.full_tensor()
            b = None if getattr(head, "bias", None) is None else head.bias.detach().to(h.dtype)
            _, st = linear_cross_entropy(h, w.to(h.dtype), self.labels, bias=b, objective=Entropy(),
                                         reduction="sum", shift=True, return_stats=True, softcap=self.softcap,
                                         validate=False)
            n = st.num_tokens.double()
            vals = torch.stack([n, st.nll.double() * n, st.mean_prob.double() * n, st.accuracy.double() * n,
                                st.entropy.double() * n])
            self.sums += vals
        self.labels = None

    @staticmethod
    def finish(sums: torch.Tensor) -> dict:
        """Token-weighted means from (all-reduced) sums."""
        vals = sums.tolist()
        n = max(vals[0], 1.0)
        return {"target_tokens": int(vals[0]), "nll": vals[1] / n, "mean_prob": vals[2] / n,
                "accuracy": vals[3] / n, "entropy": vals[4] / n}
