"""LLaMA-Factory's use_eaft_loss and use_asft_loss through dft_kernels.integrations.llamafactory, without
LLaMA-Factory (it runs end to end in its own environment: `make integration`, integration/smoke_llamafactory.py).

- split_config routes use_eaft_loss to dk.EAFT(top_k=20, normalizer=3.0, alpha=eaft_alpha) and use_asft_loss
  (asft_alpha) to an anchor, and refuses what it cannot honour, naming the key;
- one optimizer step of 2 micro-batches through transformers.Trainer (EAFT: the patched model;
  ASFT: anchored_trainer around a stand-in for LLaMA-Factory's CustomSeq2SeqTrainer, which keeps a
  ref_model and sets a compute_loss_func): the logged loss and gradient norm equal a float64
  re-derivation of LLaMA-Factory's formulas on the full logits (its EAFT: CE weighted by the detached
  top-20 entropy / 3 to the alpha, sum / num_items_in_batch; its ASFT: per micro-batch, the mean DFT over
  valid tokens + asft_alpha x the mean KL(ref || policy), summed over the micro-batches, not divided by the
  accumulation steps), and the reference model is never modified and never builds logits.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

import dft_kernels as dk
from helpers import rel_err

transformers = pytest.importorskip("transformers")

from trainer_helpers import BS, pad_collate, tiny_llama, token_rows  # noqa: E402

from dft_kernels.integrations.common import Anchor  # noqa: E402
from dft_kernels.integrations.llamafactory import PatchModelCallback, anchored_trainer, split_config  # noqa: E402

GA = 2
TOL = 1e-5


# ------------------------------------------------------------------ the config


def test_use_eaft_loss_is_ours():
    opts, rest = split_config({"stage": "sft", "use_eaft_loss": True, "eaft_alpha": 0.5,
                               "dft_kernels": {"chunk_size": 16}})
    assert opts.objective == dk.EAFT(alpha=0.5, top_k=20, normalizer=3.0)
    assert dict(opts.loss_kwargs) == {"chunk_size": 16} and opts.anchor is None
    assert "use_eaft_loss" not in rest  # LLaMA-Factory must not install its own EAFT on the logits
    assert split_config({"use_eaft_loss": True})[0].objective == dk.EAFT(alpha=1.0, top_k=20, normalizer=3.0)


def test_use_asft_loss_is_ours():
    opts, rest = split_config({"stage": "sft", "finetuning_type": "full", "use_asft_loss": True, "asft_alpha": 0.2})
    assert opts.objective == dk.DFT() and opts.anchor == Anchor(kl_coef=0.2, kl="forward", normalization="llamafactory")
    assert rest["use_asft_loss"] is True  # LLaMA-Factory still builds and prepares the reference model
    opts, _ = split_config({"finetuning_type": "lora", "ref_model": "base", "use_asft_loss": True,
                            "dft_kernels": {"objective": "eaft", "kl": "reverse", "asft_normalization": "tokens"}})
    assert opts.objective == dk.EAFT() and opts.anchor == Anchor(kl_coef=0.1, kl="reverse", normalization="tokens")


@pytest.mark.parametrize("config, match", [
    ({"use_eaft_loss": True, "use_asft_loss": True, "finetuning_type": "full"}, "use_eaft_loss and use_asft_loss"),
    ({"use_eaft_loss": True, "dft_kernels": {"objective": "dft"}}, "dft_kernels.objective"),
    ({"use_asft_loss": True}, "ref_model"),   # LLaMA-Factory's default finetuning_type is lora
    ({"use_asft_loss": True, "finetuning_type": "full", "stage": "pt"}, "stage"),
    ({"dft_kernels": {"kl_coef": 0.1}}, "dft_kernels.kl_coef"),
    ({"use_asft_loss": True, "finetuning_type": "full", "dft_kernels": {"kl": "sideways"}}, "kl must be"),
    ({"use_asft_loss": True, "finetuning_type": "full", "asft_alpha": -1.0}, "asft_alpha"),
    ({"use_asft_loss": True, "finetuning_type": "full", "dft_kernels": {"asft_normalization": "x"}},
     "asft_normalization"),
    ({"use_asft_loss": True, "finetuning_type": "full", "asft_alpha": 0.1, "dft_kernels": {"kl_coef": 0.3}},
     "differs from asft_alpha"),
])
def test_two_head_options_refused_with_a_reason(config, match):
    with pytest.raises(ValueError, match=match):
        split_config(config)


# ------------------------------------------------------------------ LLaMA-Factory's formulas, float64, full logits


def _shifted(logits, labels):
    return logits[:, :-1].reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1)


def lf_eaft(logits, labels, num_items, alpha):
    """LLaMA-Factory's use_eaft_loss, re-derived: CE x sg((top-20 entropy) / 3)^alpha, sum / num_items."""
    z, t = _shifted(logits, labels)
    valid = t != -100
    ce = F.cross_entropy(z[valid], t[valid], reduction="none")
    with torch.no_grad():
        top = z[valid].topk(20, dim=-1).values.log_softmax(-1)
        weight = (-(top.exp() * top).sum(-1) / 3.0) ** alpha
    return (ce * weight).sum() / num_items


def lf_asft(logits, ref_logits, labels, alpha, kl="forward"):
    """LLaMA-Factory's use_asft_loss, re-derived: per micro-batch, mean DFT + alpha x mean KL(ref || policy)
    over the valid tokens (kl="reverse": KL(policy || ref), ours only)."""
    z, t = _shifted(logits, labels)
    zr, _ = _shifted(ref_logits, labels)
    valid = t != -100
    ce = F.cross_entropy(z[valid], t[valid], reduction="none")
    dft = (ce * torch.exp(-ce).detach()).mean()
    logp, logq = z[valid].log_softmax(-1), zr[valid].log_softmax(-1)
    if kl == "forward":
        div = (logq.exp() * (logq - logp)).sum(-1)
    else:
        div = (logp.exp() * (logp - logq)).sum(-1)
    return dft + alpha * div.mean()


# ------------------------------------------------------------------ one optimizer step through Trainer


class LlamaFactoryLikeTrainer(transformers.Trainer):
    """The part of LLaMA-Factory's CustomSeq2SeqTrainer that anchored_trainer relies on: ``finetuning_args``,
    ``ref_model``, and its ASFT as a compute_loss_func (which must not run)."""

    def __init__(self, finetuning_args, ref_model=None, **kwargs):
        super().__init__(**kwargs)
        self.finetuning_args = finetuning_args
        self.ref_model = ref_model

        def theirs(*args, **kw):
            raise AssertionError("LLaMA-Factory's ASFT on the logits ran")

        if finetuning_args.use_asft_loss:
            self.compute_loss_func = theirs


class FinetuningArgs:
    def __init__(self, use_asft_loss):
        self.use_asft_loss = use_asft_loss


def _args(tmp_path):
    return transformers.TrainingArguments(
        output_dir=str(tmp_path), per_device_train_batch_size=BS, gradient_accumulation_steps=GA, max_steps=1,
        learning_rate=1e-3, logging_steps=1, save_strategy="no", report_to=[], use_cpu=True,
        dataloader_num_workers=0, disable_tqdm=True, seed=0, max_grad_norm=1e9)


def _run(tmp_path, config, ref_model=None, make=tiny_llama):
    torch.manual_seed(1)
    model = make()
    rows = token_rows(GA * BS)
    options, rest = split_config(config)
    init = copy.deepcopy(model.state_dict())
    batches = []

    def record(module, args, kwargs):
        if module.training:
            batches.append({k: (v.detach().clone() if isinstance(v, torch.Tensor) else v) for k, v in kwargs.items()
                            if k in ("input_ids", "attention_mask", "labels", "num_items_in_batch")})

    model.register_forward_pre_hook(record, with_kwargs=True)
    patcher = PatchModelCallback(options)
    kwargs = dict(model=model, args=_args(tmp_path), train_dataset=rows, data_collator=pad_collate, callbacks=[patcher])
    if options.anchor is not None:
        trainer_cls = anchored_trainer(LlamaFactoryLikeTrainer, options.anchor)
        trainer = trainer_cls(finetuning_args=FinetuningArgs(True), ref_model=ref_model, **kwargs)
    else:
        trainer = LlamaFactoryLikeTrainer(finetuning_args=FinetuningArgs(False), **kwargs)
    trainer.train()
    assert patcher.micro_batches == model.dft_kernels_fused_calls == GA
    log = next(h for h in trainer.state.log_history if "loss" in h)
    return options, init, batches, float(log["loss"]), float(log["grad_norm"])


def _float64(model_state, batches, loss_fn, make=tiny_llama):
    ref = make().double()
    ref.load_state_dict({k: v.double() for k, v in model_state.items()})
    ref.train()
    total = torch.zeros((), dtype=torch.float64)
    for b in batches:
        logits = ref(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits
        total = total + loss_fn(logits, b)
    total.backward()
    norm = torch.sqrt(sum((p.grad.double() ** 2).sum() for p in ref.parameters() if p.grad is not None))
    return float(total.detach()), float(norm)


@pytest.mark.parametrize("alpha", [1.0, 0.5])
def test_eaft_step_matches_llamafactory_formula(tmp_path, alpha):
    options, init, batches, loss, gnorm = _run(tmp_path, {"use_eaft_loss": True, "eaft_alpha": alpha,
                                                          "dft_kernels": {"chunk_size": 8}})
    assert options.objective == dk.EAFT(alpha=alpha, top_k=20, normalizer=3.0)
    report = f"EAFT alpha {alpha}"
    nib = {int(b["num_items_in_batch"]) for b in batches}
    assert nib == {sum(int((b["labels"][:, 1:] != -100).sum()) for b in batches)}
    want, want_norm = _float64(init, batches, lambda z, b: lf_eaft(z, b["labels"], int(b["num_items_in_batch"]),
                                                                   alpha))
    print(f"{report}: loss {loss!r} vs {want!r}, grad norm {gnorm!r} vs {want_norm!r}")
    assert rel_err(torch.tensor(loss, dtype=torch.float64), torch.tensor(want)) <= TOL, (loss, want)
    assert rel_err(torch.tensor(gnorm, dtype=torch.float64), torch.tensor(want_norm)) <= TOL, (gnorm, want_norm)


@pytest.mark.parametrize("normalization, kl", [("llamafactory", "forward"), ("tokens", "forward"),
                                               ("llamafactory", "reverse")])
def test_asft_step_matches_llamafactory_formula(tmp_path, normalization, kl):
    torch.manual_seed(7)
    reference = tiny_llama()   # another random model, so that the KL and its gradient are not 0 at step 1
    ref_before = copy.deepcopy(reference.state_dict())
    calls = []
    reference.lm_head.register_forward_hook(lambda *a: calls.append("lm_head"))
    config = {"use_asft_loss": True, "asft_alpha": 0.3, "finetuning_type": "full",
              "dft_kernels": {"chunk_size": 8, "kl": kl, "asft_normalization": normalization}}
    options, init, batches, loss, gnorm = _run(tmp_path, config, ref_model=reference)
    assert options.anchor == Anchor(kl_coef=0.3, kl=kl, normalization=normalization)
    assert not calls, "the reference model's lm_head ran: its logits were built"
    assert all(torch.equal(v, ref_before[k]) for k, v in reference.state_dict().items())
    ref64 = tiny_llama().double().eval()
    ref64.load_state_dict({k: v.double() for k, v in ref_before.items()})
    n_all = sum(int((b["labels"][:, 1:] != -100).sum()) for b in batches)

    def theirs(logits, b):
        with torch.no_grad():
            ref_logits = ref64(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits
        per_mb = lf_asft(logits, ref_logits, b["labels"], 0.3, kl)
        if normalization == "tokens":   # the same per-token terms, / the step's valid tokens
            return per_mb * int((b["labels"][:, 1:] != -100).sum()) / n_all
        return per_mb

    want, want_norm = _float64(init, batches, theirs)
    print(f"ASFT {normalization} {kl}: loss {loss!r} vs {want!r}, grad norm {gnorm!r} vs {want_norm!r}")
    assert rel_err(torch.tensor(loss, dtype=torch.float64), torch.tensor(want)) <= TOL, (loss, want)
    assert rel_err(torch.tensor(gnorm, dtype=torch.float64), torch.tensor(want_norm)) <= TOL, (gnorm, want_norm)


def test_asft_without_reference_model_raises(tmp_path):
    options, _ = split_config({"use_asft_loss": True, "finetuning_type": "full"})
    cls = anchored_trainer(LlamaFactoryLikeTrainer, options.anchor)
    with pytest.raises(ValueError, match="no reference model"):
        cls(finetuning_args=FinetuningArgs(True), ref_model=None, model=tiny_llama(), args=_args(tmp_path),
            train_dataset=token_rows(4), data_collator=pad_collate, callbacks=[PatchModelCallback(options)])


def test_asft_evaluation_loss_is_the_anchored_loss(tmp_path):
    """evaluate(): the eval loss is the anchored loss of the eval batch (no gradient, eval mode), as the
    mean over its valid tokens of DFT + asft_alpha * KL (one eval batch)."""
    torch.manual_seed(7)
    reference = tiny_llama()
    torch.manual_seed(1)
    model = tiny_llama()
    options, _ = split_config({"use_asft_loss": True, "asft_alpha": 0.3, "finetuning_type": "full",
                               "dft_kernels": {"chunk_size": 8}})
    rows = token_rows(BS)
    cls = anchored_trainer(LlamaFactoryLikeTrainer, options.anchor)
    trainer = cls(finetuning_args=FinetuningArgs(True), ref_model=reference, model=model, args=_args(tmp_path),
                  train_dataset=rows, eval_dataset=rows, data_collator=pad_collate,
                  callbacks=[PatchModelCallback(options)])
    got = trainer.evaluate()["eval_loss"]
    batch = pad_collate(rows)
    with torch.no_grad():
        m64, r64 = copy.deepcopy(model).double().eval(), copy.deepcopy(reference).double().eval()
        dk.unpatch(m64)
        fwd = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
        want = lf_asft(m64(**fwd).logits, r64(**fwd).logits, batch["labels"], 0.3)
    assert rel_err(torch.tensor(got, dtype=torch.float64), want) <= TOL, (got, float(want))


def tiny_gemma2():
    """Gemma 2: a final logit softcap (2.0, so that it bends these logits) on both heads."""
    cfg = transformers.Gemma2Config(vocab_size=61, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                    num_attention_heads=4, num_key_value_heads=2, head_dim=8,
                                    initializer_range=0.3, final_logit_softcapping=2.0, pad_token_id=0,
                                    bos_token_id=1, eos_token_id=2)
    return transformers.Gemma2ForCausalLM(cfg).float()


def tiny_granite():
    """Granite: logits divided by logits_scaling (0.25: the logits grow 4x) on both heads."""
    cfg = transformers.GraniteConfig(vocab_size=61, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                     num_attention_heads=4, num_key_value_heads=2, initializer_range=0.3,
                                     logits_scaling=0.25, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    return transformers.GraniteForCausalLM(cfg).float()


@pytest.mark.parametrize("make", [tiny_gemma2, tiny_granite], ids=["softcap", "logits_scaling"])
def test_asft_with_a_logit_transform_on_both_heads(tmp_path, make):
    """A model whose config softcaps or scales its logits: the reference's scale is folded into its hidden
    states, one softcap applies to both heads (LLaMA-Factory's formula on both models' final logits)."""
    torch.manual_seed(7)
    reference = make()
    ref_before = copy.deepcopy(reference.state_dict())
    config = {"use_asft_loss": True, "asft_alpha": 0.3, "finetuning_type": "full", "dft_kernels": {"chunk_size": 8}}
    _, init, batches, loss, gnorm = _run(tmp_path, config, ref_model=reference, make=make)
    ref64 = make().double().eval()
    ref64.load_state_dict({k: v.double() for k, v in ref_before.items()})

    def theirs(logits, b):
        with torch.no_grad():
            ref_logits = ref64(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits
        return lf_asft(logits, ref_logits, b["labels"], 0.3)

    want, want_norm = _float64(init, batches, theirs, make=make)
    assert rel_err(torch.tensor(loss, dtype=torch.float64), torch.tensor(want)) <= TOL, (loss, want)
    assert rel_err(torch.tensor(gnorm, dtype=torch.float64), torch.tensor(want_norm)) <= TOL, (gnorm, want_norm)


def test_asft_refuses_different_softcaps(tmp_path):
    torch.manual_seed(7)
    reference = tiny_llama()   # no softcap, while the trained Gemma 2 has one
    config = {"use_asft_loss": True, "finetuning_type": "full"}
    with pytest.raises(ValueError, match="softcap"):
        _run(tmp_path, config, ref_model=reference, make=tiny_gemma2)
