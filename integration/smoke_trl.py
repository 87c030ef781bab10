"""TRL smoke test: ``DFTSFTTrainer`` (ours) vs ``SFTTrainer(loss_type="dft")`` (theirs), Python API.

Extra run "bypass": TRL's stock ``SFTTrainer`` on a ``dk.patch``-ed model (its fused LM head
computes its own loss and bypasses the patch) must stop with an error, not train.
See integration/common.py for what is checked.
"""

from __future__ import annotations

import sys
from pathlib import Path

from integration import common

NAME = "trl"
DIST = "trl"
EXTRA_RUNS = ("bypass",)


def prepare(work: Path) -> None:
    common.write_jsonl(common.rows(), work / "train.jsonl")


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
