"""ms-swift smoke test: ``dft_kernels.integrations.ms_swift.run(argv)`` (what
``python -m dft_kernels.integrations.ms_swift sft ...`` runs; ours) vs ms-swift's ``sft_main``
with ``--enable_dft_loss true`` (theirs), the same arguments otherwise.

Extra run "refuse": ``--enable_dft_loss true`` together with the dft_kernels callback must raise
before training.  See integration/common.py for what is checked.
"""

from __future__ import annotations

import sys
from pathlib import Path

from integration import common

NAME = "ms-swift"
DIST = "ms-swift"
EXTRA_RUNS = ("refuse",)


def prepare(work: Path) -> None:
    common.write_jsonl(common.rows(), work / "train.jsonl")


def _argv(work: Path, kind: str) -> list[str]:
    return ["--model", str(work / "model"), "--model_type", "llama", "--template", "default",
            "--dataset", str(work / "train.jsonl"), "--split_dataset_ratio", "0", "--max_length", "128",
            "--tuner_type", "full", "--torch_dtype", "float32",
            "--per_device_train_batch_size", str(common.BS), "--gradient_accumulation_steps", str(common.GA),
            "--max_steps", str(common.STEPS), "--learning_rate", str(common.LR), "--lr_scheduler_type", "linear",
            "--warmup_ratio", "0", "--logging_steps", "1", "--save_strategy", "no", "--report_to", "none",
            "--seed", str(common.SEED), "--dataloader_num_workers", "0", "--dataset_num_proc", "1",
            "--output_dir", str(work / f"out-{kind}"), "--add_version", "false"]


def run(kind: str, work: Path) -> dict:
    if kind == "ours":
        from dft_kernels.integrations.common import LossOptions
        from dft_kernels.integrations.ms_swift import run as run_dft_kernels

        options = LossOptions.from_config({"objective": common.OBJECTIVE, "chunk_size": common.CHUNK})
        run_dft_kernels(_argv(work, kind), options)
        callback = next(cb for cb in common.RECORDER.trainer.callback_handler.callbacks
                        if type(cb).__name__ == "DFTKernelsCallback")
        return {"fused_calls": callback.model.dft_kernels_fused_calls,
                "checked_micro_batches": callback.micro_batches}
    if kind == "theirs":
        from swift.pipelines import sft_main

        sft_main(_argv(work, kind) + ["--enable_dft_loss", "true"])
        return {}
    if kind == "refuse":
        from dft_kernels.integrations.ms_swift import run as run_dft_kernels

        try:
            run_dft_kernels(_argv(work, kind) + ["--enable_dft_loss", "true"])
        except ValueError as e:
            return {"ok": "enable_dft_loss" in str(e), "detail": f"--enable_dft_loss with dft_kernels raised: {e}"}
        return {"ok": False, "detail": "--enable_dft_loss together with dft_kernels trained without an error"}
    raise ValueError(kind)


if __name__ == "__main__":
    common.main(sys.modules[__name__])
