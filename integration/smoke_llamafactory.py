"""LLaMA-Factory smoke test: ``dft_kernels.integrations.llamafactory.run(sft.yaml)`` (what
``python -m dft_kernels.integrations.llamafactory sft.yaml`` runs; ours) vs LLaMA-Factory's
``run_exp`` with ``use_dft_loss: true`` (theirs), the same YAML otherwise.

Extra run "refuse": ``use_dft_loss: true`` together with the dft_kernels section must raise
before anything is loaded.

Pairs (``PAIRS``), the same YAML run through ours and through LLaMA-Factory:

* ``use_eaft_loss`` (``eaft_alpha: 0.5``): ours trains ``dk.EAFT(alpha=0.5, top_k=20, normalizer=3.0)``
  on the patched model; theirs LLaMA-Factory's EAFT on the full logits;
* ``use_asft_loss`` (``asft_alpha: 0.1``, ``ref_model``: another random model of the same shape, so
  that the KL term and its gradient are not zero at step 1): ours the anchored loss from the
  reference model's hidden states and head weight; theirs LLaMA-Factory's ASFT on both models' full
  logits.

See integration/common.py for what is checked.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from integration import common

NAME = "llamafactory"
DIST = "llamafactory"
EXTRA_RUNS = ("refuse",)
PAIRS = {"use_eaft_loss": ("eaft-ours", "eaft-theirs"), "use_asft_loss": ("asft-ours", "asft-theirs")}
EAFT_ALPHA, ASFT_ALPHA = 0.5, 0.1


def _config(work: Path, kind: str) -> dict:
    return {
        "model_name_or_path": str(work / "model"), "stage": "sft", "do_train": True, "finetuning_type": "full",
        "dataset": "tiny", "dataset_dir": str(work / "data"), "template": "empty", "cutoff_len": 128,
        "overwrite_cache": True, "output_dir": str(work / f"out-{kind}"), "overwrite_output_dir": True,
        "logging_steps": 1, "save_strategy": "no", "plot_loss": False, "report_to": "none",
        "per_device_train_batch_size": common.BS, "gradient_accumulation_steps": common.GA,
        "learning_rate": common.LR, "max_steps": common.STEPS, "lr_scheduler_type": "linear", "bf16": False,
        "seed": common.SEED, "dataloader_num_workers": 0, "disable_tqdm": True, "use_cpu": True,
    }


def prepare(work: Path) -> None:
    data = work / "data"
    data.mkdir()
    common.write_jsonl(common.rows(), data / "train.jsonl")
    info = {"tiny": {"file_name": "train.jsonl", "columns": {"prompt": "prompt", "response": "completion"}}}
    (data / "dataset_info.json").write_text(json.dumps(info))
    import yaml

    ours = {**_config(work, "ours"), "dft_kernels": {"objective": common.OBJECTIVE, "chunk_size": common.CHUNK}}
    (work / "sft_dft_kernels.yaml").write_text(yaml.safe_dump(ours))
    (work / "sft_refused.yaml").write_text(yaml.safe_dump({**ours, "use_dft_loss": True}))
    (work / "sft_use_dft_loss.yaml").write_text(yaml.safe_dump({**_config(work, "theirs"), "use_dft_loss": True}))
    common.write_model(work / "ref_model", seed=common.SEED + 1)
    eaft = {"use_eaft_loss": True, "eaft_alpha": EAFT_ALPHA}
    asft = {"use_asft_loss": True, "asft_alpha": ASFT_ALPHA, "ref_model": str(work / "ref_model")}
    section = {"dft_kernels": {"chunk_size": common.CHUNK}}
    for name, extra in (("eaft", eaft), ("asft", asft)):
        (work / f"sft_{name}_ours.yaml").write_text(yaml.safe_dump({**_config(work, f"{name}-ours"), **extra,
                                                                     **section}))
        (work / f"sft_{name}_theirs.yaml").write_text(yaml.safe_dump({**_config(work, f"{name}-theirs"), **extra}))


def run(kind: str, work: Path) -> dict:
    if kind == "ours":
        from dft_kernels.integrations.llamafactory import run as run_dft_kernels

        callback = run_dft_kernels(work / "sft_dft_kernels.yaml")
        return {"fused_calls": callback.model.dft_kernels_fused_calls,
                "checked_micro_batches": callback.micro_batches}
    if kind == "theirs":
        import yaml
        from llamafactory.train.tuner import run_exp

        run_exp(yaml.safe_load((work / "sft_use_dft_loss.yaml").read_text()))
        return {}
    if kind in ("eaft-ours", "asft-ours"):
        from dft_kernels.integrations.llamafactory import run as run_dft_kernels

        callback = run_dft_kernels(work / f"sft_{kind.replace('-', '_')}.yaml")
        objective = callback.model.dft_kernels_objective
        return {"fused_calls": callback.model.dft_kernels_fused_calls,
                "checked_micro_batches": callback.micro_batches,
                "detail": f"objective {objective!r}, anchor {callback.options.anchor!r}"}
    if kind in ("eaft-theirs", "asft-theirs"):
        import yaml
        from llamafactory.train.tuner import run_exp

        run_exp(yaml.safe_load((work / f"sft_{kind.replace('-', '_')}.yaml").read_text()))
        return {}
    if kind == "refuse":
        from dft_kernels.integrations.llamafactory import run as run_dft_kernels

        try:
            run_dft_kernels(work / "sft_refused.yaml")
        except ValueError as e:
            return {"ok": "use_dft_loss" in str(e), "detail": f"use_dft_loss with dft_kernels raised: {e}"}
        return {"ok": False, "detail": "use_dft_loss together with dft_kernels trained without an error"}
    raise ValueError(kind)


if __name__ == "__main__":
    common.main(sys.modules[__name__])
