"""dft_kernels.integrations in the test environment (transformers + TRL; LLaMA-Factory and axolotl
run end to end in their own pinned environments: `make integration`, integration/).

- LossOptions: a trainer config's dft_kernels section -> objective and dk.patch options, errors named;
- FusedLossCheck: training stops before the optimizer step when a micro-batch bypasses the fused loss;
- DFTSFTTrainer (TRL): logged losses equal the float64 reference, every micro-batch checked;
- the LLaMA-Factory config split: the options that would bypass the dft_kernels loss are refused.
"""

from __future__ import annotations

import pytest
import torch

import dft_kernels as dk

transformers = pytest.importorskip("transformers")
pytest.importorskip("trl")

from trainer_helpers import (  # noqa: E402
    GA,
    STEPS,
    Recorder,
    check_logged,
    pad_collate,
    sft_args,
    sft_dataset,
    tiny_llama,
    token_rows,
    trainer_args,
    word_tokenizer,
)

from dft_kernels.integrations import FusedLossCheck, LossOptions  # noqa: E402
from dft_kernels.integrations.llamafactory import split_config  # noqa: E402
from dft_kernels.integrations.trl import DFTSFTTrainer  # noqa: E402

# ------------------------------------------------------------------ LossOptions


def test_loss_options_default_is_dft():
    opts = LossOptions.from_config(None)
    assert opts.objective == dk.DFT() and dict(opts.loss_kwargs) == {}


def test_loss_options_objective_parameters_and_patch_options():
    opts = LossOptions.from_config({"objective": "dft", "min_weight": 0.1, "chunk_size": 8, "z_loss": 1e-4,
                                    "accum_dtype": "bf16"})
    assert opts.objective == dk.DFT(min_weight=0.1)
    assert dict(opts.loss_kwargs) == {"chunk_size": 8, "z_loss": 1e-4, "accum_dtype": torch.bfloat16}
    assert LossOptions.from_config({"objective": "Power", "alpha": 0.5}).objective == dk.Power(alpha=0.5)
    assert LossOptions.from_config({"objective": dk.Chord()}).objective == dk.Chord()


@pytest.mark.parametrize("config, error, match", [
    ({"objective": "dtf"}, ValueError, "unknown objective 'dtf'"),
    ({"objective": 3}, TypeError, "objective must be an objective name"),
    ({"objective": "dft", "alpha": 0.5}, ValueError, "alpha not a parameter of objective DFT"),
    ({"objective": "dft", "min_weight": 2.0}, ValueError, "dft_kernels: .*min_weight"),
    ({"reduction": "sum"}, ValueError, "reduction"),
    ({"accum_dtype": "float8"}, ValueError, "accum_dtype"),
    (["dft"], TypeError, "must be a mapping"),
])
def test_loss_options_errors_name_the_key(config, error, match):
    with pytest.raises(error, match=match):
        LossOptions.from_config(config)


def test_loss_options_unknown_patch_option_raises_at_patch():
    opts = LossOptions.from_config({"softcap": 30.0})
    with pytest.raises(TypeError, match="softcap"):
        opts.patch(tiny_llama())


# ------------------------------------------------------------------ FusedLossCheck


def _trainer(tmp_path, model, **kwargs):
    check = FusedLossCheck()
    trainer = transformers.Trainer(model=model, args=trainer_args(transformers.TrainingArguments, tmp_path),
                                   train_dataset=token_rows(), data_collator=pad_collate, callbacks=[check],
                                   **kwargs)
    return trainer, check


def test_fused_loss_check_counts_every_micro_batch(tmp_path):
    model = dk.patch(tiny_llama(), "dft", chunk_size=8)
    trainer, check = _trainer(tmp_path, model)
    trainer.train()
    assert check.micro_batches == model.dft_kernels_fused_calls == STEPS * GA


def test_fused_loss_check_stops_a_bypassed_loss_before_the_optimizer_step(tmp_path):
    """compute_loss_func pops the labels: the patched model runs its original forward, the trainer
    computes its own loss on the logits. The check must stop training before any update."""
    model = dk.patch(tiny_llama(), "dft")
    before = model.lm_head.weight.detach().clone()
    trainer, check = _trainer(tmp_path, model, compute_loss_func=dk.hf.compute_loss_func("ce"))
    with pytest.warns(UserWarning, match="without labels"), pytest.raises(RuntimeError, match="did not run through"):
        trainer.train()
    assert check.micro_batches == 0 and trainer.state.global_step == 0
    assert torch.equal(model.lm_head.weight, before)


def test_fused_loss_check_refuses_an_unpatched_model(tmp_path):
    trainer, _ = _trainer(tmp_path, tiny_llama())
    with pytest.raises(RuntimeError, match="not patched"):
        trainer.train()


# ------------------------------------------------------------------ TRL


def test_dft_sft_trainer_logs_the_reference_loss(tmp_path):
    objective = dk.DFT(min_weight=0.1)  # test_hf_trainers covers "dft" through the same ModelLossMixin
    model = tiny_llama()
    recorder = Recorder(model)
    trainer = DFTSFTTrainer(model=model, args=sft_args(tmp_path), train_dataset=sft_dataset(),
                            processing_class=word_tokenizer(), callbacks=[recorder], dft_objective=objective,
                            dft_loss_kwargs={"chunk_size": 8})
    assert dk.hf.is_patched(model) and model.dft_kernels_objective == dk.get_objective(objective)
    trainer.train()
    assert model.dft_kernels_fused_calls == trainer.fused_loss_check.micro_batches == STEPS * GA
    check_logged(trainer, model, recorder, objective)


@pytest.mark.parametrize("extra, match", [
    (dict(label_smoothing_factor=0.1), "label_smoothing"),
    (dict(compute_loss_func=dk.hf.compute_loss_func("dft")), "compute_loss_func"),
])
def test_dft_sft_trainer_refuses_a_loss_on_the_logits(tmp_path, extra, match):
    args = sft_args(tmp_path)
    if "label_smoothing_factor" in extra:
        args.label_smoothing_factor = extra.pop("label_smoothing_factor")
    with pytest.raises(ValueError, match=match):
        DFTSFTTrainer(model=tiny_llama(), args=args, train_dataset=sft_dataset(), processing_class=word_tokenizer(),
                      **extra)


# ------------------------------------------------------------------ LLaMA-Factory config (no LLaMA-Factory needed)


def test_llamafactory_split_config():
    opts, rest = split_config({"stage": "sft", "model_name_or_path": "m",
                               "dft_kernels": {"objective": "dft", "min_weight": 0.1, "chunk_size": 4096}})
    assert opts.objective == dk.DFT(min_weight=0.1) and dict(opts.loss_kwargs) == {"chunk_size": 4096}
    assert rest == {"stage": "sft", "model_name_or_path": "m"}
    assert split_config({"stage": "pt"})[0].objective == dk.DFT()


@pytest.mark.parametrize("config, match", [
    ({"use_dft_loss": True}, "use_dft_loss"),
    ({"use_asft_loss": True}, "use_asft_loss"),
    ({"stage": "dpo"}, "stage"),
    ({"label_smoothing_factor": 0.1}, "label_smoothing_factor"),
    ({"dft_kernels": {"objective": "nope"}}, "unknown objective"),
])
def test_llamafactory_split_config_refuses_other_losses(config, match):
    with pytest.raises(ValueError, match=match):
        split_config(config)


def test_grpo_head_on_a_trl_without_fused_head_names_the_version(monkeypatch):
    """On TRL < 1.15 (Python 3.10 resolves 1.14) the GRPO integration raises an ImportError naming the
    TRL it needs; DFTSFTTrainer (above) works with any TRL >= 1.0."""
    import dft_kernels.integrations.trl as dk_trl

    monkeypatch.setattr(dk_trl, "FusedCausalLMOutput", None)
    with pytest.raises(ImportError, match=r"add_logprob_head needs TRL >= 1\.15"):
        dk_trl.add_logprob_head(torch.nn.Linear(2, 2))
    with pytest.raises(ImportError, match=r"DFTGRPOTrainer needs TRL >= 1\.15"):
        dk_trl.DFTGRPOTrainer(model=None, reward_funcs=None)
