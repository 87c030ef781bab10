"""A dk.patch-ed tiny model trained by transformers.Trainer and TRL's SFTTrainer on CPU.

Each run takes 3 optimizer steps with gradient accumulation 2; the loss the trainer logs at
each step must equal the float64 reference loss of the same two micro-batches under the
parameters of that step (sum of per-token losses / valid tokens of the whole accumulated
batch, which is what ``num_items_in_batch`` normalisation gives).
"""

from __future__ import annotations

import copy

import pytest
import torch

import dft_kernels as dk
from dft_kernels import hf as dkhf
from helpers import rel_err

transformers = pytest.importorskip("transformers")

from trainer_helpers import (  # noqa: E402
    BS,
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


@pytest.mark.parametrize("objective", ["dft", dk.DFT(min_weight=0.1)])
def test_hf_trainer_with_patched_model(tmp_path, objective):
    model = tiny_llama()
    dk.patch(model, objective, chunk_size=8)
    recorder = Recorder(model)
    trainer = transformers.Trainer(model=model, args=trainer_args(transformers.TrainingArguments, tmp_path),
                                   train_dataset=token_rows(), data_collator=pad_collate, callbacks=[recorder])
    assert trainer.model_accepts_loss_kwargs  # so Trainer passes num_items_in_batch to the forward
    trainer.train()
    assert model.dft_kernels_fused_calls == STEPS * GA
    assert all("num_items_in_batch" in b for b in recorder.batches)
    check_logged(trainer, model, recorder, objective)
    # evaluate(): eval mode keeps the logits; eval_loss is the objective's mean on the eval batch
    rows = token_rows(BS)
    metrics = trainer.evaluate(eval_dataset=rows)
    batch = pad_collate(rows)
    ref = type(model)(copy.deepcopy(model.config)).double()
    ref.load_state_dict({k: v.double() for k, v in model.state_dict().items()})
    with torch.no_grad():
        logits = ref(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    want = dk.reference.cross_entropy(logits, batch["labels"], objective=objective, shift=True)
    assert rel_err(torch.tensor(metrics["eval_loss"], dtype=torch.float64), want) <= 1e-5
    assert model.dft_kernels_fused_calls == STEPS * GA


def recording_loss_func(recorder, objective="dft"):
    """dk.hf.compute_loss_func, also recording the labels (the trainer pops them before the forward)."""
    fn = dkhf.compute_loss_func(objective, chunk_size=8)

    def loss_func(outputs, labels, num_items_in_batch=None):
        recorder.labels.append(labels.detach().clone())
        return fn(outputs, labels, num_items_in_batch=num_items_in_batch)

    return loss_func


def restore_labels(recorder):
    assert len(recorder.labels) == len(recorder.batches) == STEPS * GA
    for b, labels in zip(recorder.batches, recorder.labels):
        assert "labels" not in b
        b["labels"] = labels


def test_hf_trainer_compute_loss_func_on_logits(tmp_path):
    model = tiny_llama()  # not patched: the logits are kept and the loss computed on them
    recorder = Recorder(model)
    trainer = transformers.Trainer(model=model, args=trainer_args(transformers.TrainingArguments, tmp_path),
                                   train_dataset=token_rows(), data_collator=pad_collate, callbacks=[recorder],
                                   compute_loss_func=recording_loss_func(recorder))
    trainer.train()
    restore_labels(recorder)
    check_logged(trainer, model, recorder, "dft")


# ------------------------------------------------------------------ TRL


trl = pytest.importorskip("trl")


class DFTSFTTrainer(dkhf.ModelLossMixin, trl.SFTTrainer):
    pass


@pytest.mark.parametrize("bf16", [False, True], ids=["fp32", "bf16-autocast"])
def test_trl_sft_trainer_with_model_loss_mixin(tmp_path, bf16):
    model = tiny_llama()
    dk.patch(model, "dft", chunk_size=8)
    recorder = Recorder(model)
    trainer = DFTSFTTrainer(model=model, args=sft_args(tmp_path, bf16=bf16), train_dataset=sft_dataset(),
                            processing_class=word_tokenizer(), callbacks=[recorder])
    trainer.train()
    assert model.dft_kernels_fused_calls == STEPS * GA
    assert any((b["labels"][:, 1:] == -100).any() for b in recorder.batches)
    # bf16 autocast: the head GEMM runs in bfloat16 (16-bit tolerance 1e-2, docs/design.md, Tests),
    # parameters stay float32
    check_logged(trainer, model, recorder, "dft", tol=2e-2 if bf16 else 1e-5)


def test_trl_sft_trainer_bypassing_the_patch_is_an_error(tmp_path):
    """TRL's own SFTTrainer computes its loss from a fused LM head it installs, bypassing
    model.forward: training must stop with a clear error instead of silently using TRL's loss."""
    model = tiny_llama()
    dk.patch(model, "dft")
    trainer = trl.SFTTrainer(model=model, args=sft_args(tmp_path), train_dataset=sft_dataset(),
                             processing_class=word_tokenizer())
    with pytest.raises(RuntimeError, match="patched by dft_kernels.*bypassed.*ModelLossMixin"):
        trainer.train()
    assert model.dft_kernels_fused_calls == 0


def test_trl_sft_trainer_unchanged_with_compute_loss_func(tmp_path):
    """The stock SFTTrainer with dk.hf.compute_loss_func: DFT on the model's logits.  loss_type="nll" (TRL
    1.15+'s default): TRL 1.14's default "chunked_nll" head returns no logits (docs/integrations.md)."""
    model = tiny_llama()
    recorder = Recorder(model)
    args = sft_args(tmp_path)
    args.loss_type = "nll"
    trainer = trl.SFTTrainer(model=model, args=args, train_dataset=sft_dataset(),
                             processing_class=word_tokenizer(), callbacks=[recorder],
                             compute_loss_func=recording_loss_func(recorder))
    trainer.train()
    restore_labels(recorder)
    check_logged(trainer, model, recorder, "dft")
