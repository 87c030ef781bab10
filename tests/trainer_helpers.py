"""The tiny model, data and checks the trainer tests share (tests/hf/test_hf_trainers.py,
tests/integrations/): a small Llama built in-process, variable-length token rows, a word-level
tokenizer, and the check that each logged step loss equals the float64 reference loss of the same
micro-batches under that step's parameters."""

from __future__ import annotations

import copy

import pytest
import torch

import dft_kernels as dk
from helpers import rel_err

transformers = pytest.importorskip("transformers")

V = 61
STEPS, GA, BS = 3, 2, 2
LR = 5e-3


def tiny_llama():
    cfg = transformers.LlamaConfig(vocab_size=V, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, initializer_range=0.3,
                                   pad_token_id=0, bos_token_id=1, eos_token_id=2)
    return transformers.LlamaForCausalLM(cfg).float()


def token_rows(n=STEPS * GA * BS):
    """Variable-length sequences; a random prompt of each is masked out of the labels."""
    rows = []
    for _ in range(n):
        length = int(torch.randint(6, 14, ()))
        ids = torch.randint(3, V, (length,)).tolist()
        prompt = int(torch.randint(1, 4, ()))
        rows.append({"input_ids": ids, "labels": [-100] * prompt + ids[prompt:]})
    return rows


def pad_collate(rows):
    n = max(len(r["input_ids"]) for r in rows)
    ids = torch.zeros(len(rows), n, dtype=torch.long)
    labels = torch.full((len(rows), n), -100, dtype=torch.long)
    mask = torch.zeros(len(rows), n, dtype=torch.long)
    for i, r in enumerate(rows):
        k = len(r["input_ids"])
        ids[i, :k] = torch.tensor(r["input_ids"])
        labels[i, :k] = torch.tensor(r["labels"])
        mask[i, :k] = 1
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


class Recorder(transformers.TrainerCallback):
    """Snapshots the parameters before each optimizer step and the model inputs of each micro-batch."""

    def __init__(self, model):
        self.params = []
        self.batches = []
        self.labels = []
        model.register_forward_pre_hook(self._record, with_kwargs=True)

    def _record(self, module, args, kwargs):
        if module.training and torch.is_grad_enabled():
            self.batches.append({k: v.detach().clone() for k, v in kwargs.items() if isinstance(v, torch.Tensor)})

    def on_step_begin(self, args, state, control, model=None, **kwargs):
        self.params.append({k: v.detach().clone() for k, v in model.state_dict().items()})


def reference_step_losses(model, recorder, objective):
    """float64 reference loss of each optimizer step, from the unpatched model's logits."""
    # A fresh instance of the same class and config: no patch, no TRL head, no hooks.
    ref = type(model)(copy.deepcopy(model.config)).double().eval()  # eval = train: no dropout here
    assert len(recorder.params) == STEPS and len(recorder.batches) == STEPS * GA
    losses = []
    for step in range(STEPS):
        ref.load_state_dict({k: v.double() for k, v in recorder.params[step].items()})
        total, count = torch.zeros((), dtype=torch.float64), 0
        for batch in recorder.batches[step * GA:(step + 1) * GA]:
            labels = batch["labels"]
            inputs = {k: v for k, v in batch.items()
                      if k in ("input_ids", "attention_mask", "position_ids")}
            with torch.no_grad():
                logits = ref(**inputs).logits
            total = total + dk.reference.cross_entropy(logits, labels, objective=objective, shift=True,
                                                       reduction="sum")
            count += int((labels[:, 1:] != -100).sum())
            if "num_items_in_batch" in batch:  # what the trainer passed: the whole step's valid tokens
                assert int(batch["num_items_in_batch"]) == sum(
                    int((b["labels"][:, 1:] != -100).sum()) for b in recorder.batches[step * GA:(step + 1) * GA])
        losses.append(total / count)
    return losses


def logged_losses(trainer):
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert len(losses) == STEPS
    return losses


def check_logged(trainer, model, recorder, objective, tol=1e-5):
    assert trainer.state.global_step == STEPS
    want = reference_step_losses(model, recorder, objective)
    got = logged_losses(trainer)
    for step, (g, w) in enumerate(zip(got, want)):
        err = rel_err(torch.tensor(g, dtype=torch.float64), w)
        assert err <= tol, f"step {step}: logged {g} vs reference {float(w)} (rel err {err:.2e})"
    # the parameters really moved, so each step's reference differs
    assert not torch.equal(recorder.params[0]["lm_head.weight"], recorder.params[-1]["lm_head.weight"])


def trainer_args(cls, tmp_path, **extra):
    return cls(output_dir=str(tmp_path), per_device_train_batch_size=BS, gradient_accumulation_steps=GA,
               max_steps=STEPS, learning_rate=LR, logging_steps=1, save_strategy="no", report_to=[],
               per_device_eval_batch_size=BS, use_cpu=True, dataloader_num_workers=0, disable_tqdm=True,
               seed=int(torch.randint(0, 10**6, ())),
               **extra)


def word_tokenizer():
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from tokenizers.pre_tokenizers import WhitespaceSplit

    vocab = {"<pad>": 0, "<bos>": 1, "<eos>": 2, **{f"w{i}": i for i in range(3, V)}}
    tok = Tokenizer(WordLevel(vocab, unk_token="<pad>"))
    tok.pre_tokenizer = WhitespaceSplit()
    return transformers.PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<bos>",
                                                eos_token="<eos>")


def sft_dataset():
    import datasets

    rows = token_rows()
    # pre-tokenised with a completion mask: TRL builds labels (-100 on the prompt and on padding)
    return datasets.Dataset.from_dict({
        "input_ids": [r["input_ids"] for r in rows],
        "completion_mask": [[0 if lab == -100 else 1 for lab in r["labels"]] for r in rows],
    })


def sft_args(tmp_path, bf16=False):
    import trl

    # SFTConfig defaults to bf16 autocast (and gradient checkpointing); the float32 runs turn it off
    return trainer_args(trl.SFTConfig, tmp_path, completion_only_loss=True, max_length=None, packing=False,
                        bf16=bf16)
