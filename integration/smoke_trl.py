"""TRL smoke test: ``DFTSFTTrainer`` (ours) vs ``SFTTrainer(loss_type="dft")`` (theirs), Python API.

Extra run "bypass": TRL's stock ``SFTTrainer`` on a ``dk.patch``-ed model (its fused LM head
computes its own loss and bypasses the patch) must stop with an error, not train.

Pair "gkd": ``DFTGKDTrainer`` (ours: TRL's GKD with the generalized JSD from ``dk.linear_distill`` on
the hidden states) vs ``trl.experimental.gkd.GKDTrainer`` (theirs: the same loss on both models' full
logits), a teacher of the same shape with other random weights, ``beta=0.5``, ``lmbda=0`` (the
dataset's completions: no sampling, so the two runs train on the same tokens at every step).

See integration/common.py for what is checked.
"""

from __future__ import annotations

import sys
from pathlib import Path

from integration import common

NAME = "trl"
DIST = "trl"
EXTRA_RUNS = ("bypass",)
PAIRS = {"gkd": ("gkd-ours", "gkd-theirs")}
GKD_BETA = 0.5


def prepare(work: Path) -> None:
    common.write_jsonl(common.rows(), work / "train.jsonl")
    common.write_model(work / "teacher", seed=common.SEED + 1)


def _token_rows(tokenizer) -> list[dict]:
    """The prompt/completion rows as token ids: prompt + completion + eos, the prompt masked out of the labels."""
    out = []
    for r in common.rows():
        p = tokenizer(r["prompt"], add_special_tokens=False)["input_ids"]
        c = tokenizer(r["completion"], add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        out.append({"input_ids": p + c, "labels": [-100] * len(p) + c})
    return out


def _pad(rows: list[dict]) -> dict:
    import torch

    n = max(len(r["input_ids"]) for r in rows)
    batch = {"input_ids": torch.zeros(len(rows), n, dtype=torch.long),
             "attention_mask": torch.zeros(len(rows), n, dtype=torch.long),
             "labels": torch.full((len(rows), n), -100, dtype=torch.long)}
    for i, r in enumerate(rows):
        k = len(r["input_ids"])
        batch["input_ids"][i, :k] = torch.tensor(r["input_ids"])
        batch["attention_mask"][i, :k] = 1
        batch["labels"][i, :k] = torch.tensor(r["labels"])
    return batch


def _gkd(work: Path, kind: str, tokenizer):
    import os

    import datasets
    import transformers

    os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
    from trl.experimental.gkd import GKDConfig, GKDTrainer

    args = GKDConfig(
        output_dir=str(work / f"out-{kind}"), per_device_train_batch_size=common.BS,
        gradient_accumulation_steps=common.GA, max_steps=common.STEPS, learning_rate=common.LR, logging_steps=1,
        save_strategy="no", report_to=[], use_cpu=True, dataloader_num_workers=0, disable_tqdm=True,
        seed=common.SEED, bf16=False, max_length=None, beta=GKD_BETA, lmbda=0.0, max_new_tokens=8)
    model = transformers.AutoModelForCausalLM.from_pretrained(str(work / "model"))
    teacher = transformers.AutoModelForCausalLM.from_pretrained(str(work / "teacher"))
    kwargs = dict(model=model, teacher_model=teacher, args=args,
                  train_dataset=datasets.Dataset.from_list(_token_rows(tokenizer)), data_collator=_pad,
                  processing_class=tokenizer)
    if kind == "gkd-ours":
        from dft_kernels.integrations.trl import DFTGKDTrainer

        trainer = DFTGKDTrainer(**kwargs, dft_distill_kwargs={"chunk_size": common.CHUNK})
        trainer.train()
        return {"fused_calls": trainer.dft_kernels_student.dft_kernels_distill_calls}
    trainer = GKDTrainer(**kwargs)
    trainer.train()
    return {}


def _args(work: Path, kind: str, **extra):
    import trl

    return trl.SFTConfig(
        output_dir=str(work / f"out-{kind}"), per_device_train_batch_size=common.BS,
        gradient_accumulation_steps=common.GA, max_steps=common.STEPS, learning_rate=common.LR, logging_steps=1,
        save_strategy="no", report_to=[], use_cpu=True, dataloader_num_workers=0, disable_tqdm=True,
        seed=common.SEED, bf16=False, max_length=None, packing=False, completion_only_loss=True, **extra)


def _dataset(work: Path):
    import datasets

    return datasets.load_dataset("json", data_files=str(work / "train.jsonl"), split="train")


def run(kind: str, work: Path) -> dict:
    import transformers
    import trl

    model_dir = str(work / "model")
    tokenizer = transformers.AutoTokenizer.from_pretrained(model_dir)
    if kind == "ours":
        from dft_kernels.integrations.trl import DFTSFTTrainer

        trainer = DFTSFTTrainer(model=model_dir, args=_args(work, kind), train_dataset=_dataset(work),
                                processing_class=tokenizer, dft_objective=common.OBJECTIVE,
                                dft_loss_kwargs={"chunk_size": common.CHUNK})
        trainer.train()
        return {"fused_calls": trainer.model.dft_kernels_fused_calls,
                "checked_micro_batches": trainer.fused_loss_check.micro_batches}
    if kind == "theirs":
        trainer = trl.SFTTrainer(model=model_dir, args=_args(work, kind, loss_type="dft"),
                                 train_dataset=_dataset(work), processing_class=tokenizer)
        trainer.train()
        return {}
    if kind in PAIRS["gkd"]:
        return _gkd(work, kind, tokenizer)
    if kind == "bypass":
        import dft_kernels as dk

        model = transformers.AutoModelForCausalLM.from_pretrained(model_dir)
        dk.patch(model, common.OBJECTIVE)
        trainer = trl.SFTTrainer(model=model, args=_args(work, kind), train_dataset=_dataset(work),
                                 processing_class=tokenizer)
        try:
            trainer.train()
        except RuntimeError as e:
            ok = "bypassed" in str(e) and model.dft_kernels_fused_calls == 0 and trainer.state.global_step == 0
            return {"ok": ok, "detail": f"stock SFTTrainer on a patched model raised: {str(e)[:160]}..."}
        return {"ok": False, "detail": "stock SFTTrainer trained a patched model with its own loss without an error"}
    raise ValueError(kind)


if __name__ == "__main__":
    common.main(sys.modules[__name__])
