"""axolotl smoke test: ``axolotl train`` (its CLI's ``do_cli``, in process) with the
``DFTKernelsPlugin`` (ours) vs axolotl's own DFT, Liger's fused linear cross-entropy with
``liger_use_token_scaling: true`` (theirs; Liger's Triton kernels run on CPU under
``TRITON_INTERPRET=1``), the same YAML otherwise.

Extra run "refuse": the plugin together with ``liger_use_token_scaling`` must raise before the
model is loaded.  See integration/common.py for what is checked.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

# Before anything imports triton: Liger's kernels (theirs) run on CPU tensors under Triton's
# interpreter, which is read when kernels are defined.  No telemetry from a test.
if os.environ.get("CUDA_VISIBLE_DEVICES", None) != "" and not os.path.exists("/dev/nvidia0"):
    os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("AXOLOTL_DO_NOT_TRACK", "1")

from integration import common  # noqa: E402

NAME = "axolotl"
DIST = "axolotl"
EXTRA_RUNS = ("refuse",)
PLUGIN = "dft_kernels.integrations.axolotl.DFTKernelsPlugin"
LIGER = {"plugins": ["axolotl.integrations.liger.LigerPlugin"], "liger_fused_linear_cross_entropy": True,
         "liger_use_token_scaling": True}


def _config(work: Path, kind: str) -> dict:
    return {
        "base_model": str(work / "model"), "tokenizer_type": "AutoTokenizer",
        "datasets": [{"path": str(work / "train.jsonl"), "ds_type": "json", "type": {
            "field_instruction": "prompt", "field_output": "completion",
            "format": "{instruction} ", "no_input_format": "{instruction} "}}],
        "dataset_prepared_path": str(work / f"prepared-{kind}"), "val_set_size": 0, "sequence_len": 128,
        "sample_packing": False, "pad_to_sequence_len": False, "train_on_inputs": False,
        "micro_batch_size": common.BS, "gradient_accumulation_steps": common.GA, "max_steps": common.STEPS,
        "num_epochs": 1, "learning_rate": common.LR, "optimizer": "adamw_torch", "lr_scheduler": "linear",
        "warmup_steps": 0, "logging_steps": 1, "save_strategy": "no", "output_dir": str(work / f"out-{kind}"),
        "seed": common.SEED, "bf16": False, "fp16": False, "tf32": False, "dataloader_num_workers": 0,
        "use_tensorboard": False, "special_tokens": {"pad_token": "<pad>"},
    }


def prepare(work: Path) -> None:
    import yaml

    common.write_jsonl(common.rows(), work / "train.jsonl")
    ours = {**_config(work, "ours"), "plugins": [PLUGIN],
            "dft_kernels": {"objective": common.OBJECTIVE, "chunk_size": common.CHUNK}}
    (work / "ours.yml").write_text(yaml.safe_dump(ours))
    (work / "theirs.yml").write_text(yaml.safe_dump({**_config(work, "theirs"), **LIGER}))
    refused = {**ours, **LIGER, "plugins": [PLUGIN, *LIGER["plugins"]], **_config(work, "refuse")}
    (work / "refused.yml").write_text(yaml.safe_dump(refused))


def run(kind: str, work: Path) -> dict:
    from axolotl.cli.train import do_cli

    if kind == "ours":
        from axolotl.integrations.base import PluginManager

        from dft_kernels.integrations.common import patched_model

        do_cli(config=str(work / "ours.yml"))
        plugin = PluginManager.get_instance().plugins[PLUGIN]
        return {"fused_calls": patched_model(common.RECORDER.trainer.model).dft_kernels_fused_calls,
                "checked_micro_batches": plugin.check.micro_batches}
    if kind == "theirs":
        do_cli(config=str(work / "theirs.yml"))
        return {}
    if kind == "refuse":
        try:
            do_cli(config=str(work / "refused.yml"))
        except ValueError as e:
            return {"ok": "liger" in str(e), "detail": f"the plugin with liger_use_token_scaling raised: {e}"}
        return {"ok": False, "detail": "the plugin with liger_use_token_scaling trained without an error"}
    raise ValueError(kind)


if __name__ == "__main__":
    common.main(sys.modules[__name__])
