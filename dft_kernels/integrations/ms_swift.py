"""ms-swift training with the dft_kernels loss.

In place of ``swift sft [arguments]``::

    python -m dft_kernels.integrations.ms_swift sft [swift sft arguments] [--dft_kernels JSON]
    torchrun --nproc_per_node 8 -m dft_kernels.integrations.ms_swift sft [arguments] [--dft_kernels JSON]

where JSON is the ``dft_kernels`` mapping (see :class:`~dft_kernels.integrations.common.LossOptions`),
e.g. ``--dft_kernels '{"objective": "dft", "chunk_size": 4096}'`` (default: DFT).

Python: ``run(["--model", ..., "--dataset", ...], options)``.  It registers
:class:`DFTKernelsCallback` in ms-swift's ``callbacks_map`` as ``"dft_kernels"``, adds it to
``--callbacks`` and runs ms-swift's own ``sft_main``.  The callback patches the model at the end
of the trainer's ``__init__`` (ms-swift has loaded it and applied LoRA; not yet wrapped for
distributed training), refuses the trainer settings that would compute the loss on the logits
(``--enable_dft_loss``, ``--loss_type``, ``--enable_channel_loss``, sequence parallelism, label
smoothing), turns ms-swift's ``use_logits_to_keep`` off unless it was set (the fused loss builds no
logits, and ms-swift's boolean-mask form for one-sequence batches is not supported by ``dk.patch``),
and checks every micro-batch (:class:`~dft_kernels.integrations.common.FusedLossCheck`).
"""

from __future__ import annotations

import functools
import json
import sys
from typing import Any, Mapping, Optional, Sequence

from .common import FusedLossCheck, LossOptions, refuse_trainer_loss

__all__ = ["CALLBACK_NAME", "DFTKernelsCallback", "register", "run", "main"]

CALLBACK_NAME = "dft_kernels"
OPTION = "--dft_kernels"
# ms-swift arguments that make its trainer pop the labels and compute the loss on the logits.
_OWN_LOSS_ARGS = {
    "enable_dft_loss": "it is ms-swift's own DFT on the full logits; the dft_kernels options select the objective",
    "enable_channel_loss": "it computes per-channel losses on the logits",
    "loss_type": "it sets a compute_loss_func that computes the loss on the logits",
}


class DFTKernelsCallback(FusedLossCheck):
    """ms-swift callback (constructed by its trainer as ``callback(args, trainer)``): checks the
    trainer's settings and patches the model in ``on_init_end``, then checks every micro-batch."""

    def __init__(self, options: LossOptions, args=None, trainer=None):
        super().__init__()
        self.options = options
        self.trainer = trainer
        self.model = None

    def on_init_end(self, args, state, control, model=None, **kwargs):
        for key, why in _OWN_LOSS_ARGS.items():
            if getattr(args, key, None):
                raise ValueError(f"--{key} cannot be combined with the dft_kernels loss: {why}. Remove it.")
        if (getattr(args, "sequence_parallel_size", 1) or 1) > 1:
            raise ValueError("--sequence_parallel_size > 1: ms-swift then computes the loss on gathered logits; "
                             "not supported with the dft_kernels loss")
        if self.trainer is not None:
            refuse_trainer_loss(self.trainer, "dft_kernels ms-swift callback")
        if getattr(args, "use_logits_to_keep", False) is None:
            args.use_logits_to_keep = False
        if model is None:
            raise RuntimeError("dft_kernels: the trainer passed no model to its callbacks; cannot patch it")
        self.options.patch(model)
        self.model = model


def register(options: LossOptions) -> None:
    """Make ``--callbacks dft_kernels`` patch with ``options`` in this process."""
    from swift.callbacks import callbacks_map

    callbacks_map[CALLBACK_NAME] = functools.partial(DFTKernelsCallback, options)


def _split_argv(argv: Sequence[str]) -> tuple[Optional[Mapping[str, Any]], list]:
    rest, config, it = [], None, iter(argv)
    for arg in it:
        if arg == OPTION or arg.startswith(OPTION + "="):
            value = arg.split("=", 1)[1] if "=" in arg else next(it, None)
            if value is None:
                raise ValueError(f"{OPTION} needs a JSON mapping, e.g. {OPTION} '{{\"objective\": \"dft\"}}'")
            try:
                config = json.loads(value)
            except json.JSONDecodeError as e:
                raise ValueError(f"{OPTION}: not JSON ({e}): {value!r}") from e
        else:
            rest.append(arg)
    return config, rest


def run(argv: Sequence[str], options: Optional[LossOptions] = None):
    """Run ms-swift's ``sft_main`` on ``argv`` (its command-line arguments) with the model patched."""
    from swift.pipelines import sft_main

    register(options or LossOptions())
    argv = list(argv)
    if "--callbacks" in argv:  # a list argument: add ours to the names given
        argv.insert(argv.index("--callbacks") + 1, CALLBACK_NAME)
    else:
        argv += ["--callbacks", CALLBACK_NAME]
    return sft_main(argv)


def main(argv: Optional[Sequence[str]] = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__)
        raise SystemExit(0 if argv else 2)
    if argv[0] != "sft":
        raise SystemExit(f"only 'sft' is supported (the loss of ms-swift's rlhf/pt pipelines is not a token loss "
                         f"of the model's forward here), got {argv[0]!r}")
    config, rest = _split_argv(argv[1:])
    options = LossOptions.from_config(config, where=OPTION)
    from swift.cli.utils import try_use_single_device_mode  # what `swift sft` does first

    try_use_single_device_mode()
    run(rest, options)


if __name__ == "__main__":
    main()
