"""Which loss options ``dk.patch`` and ``compute_loss_func`` take (derived from
:class:`~dft_kernels.options.LossOptions`), and their check."""

from __future__ import annotations

from ..objectives import ObjectiveLike
from ..options import LINEAR_ONLY_OPTIONS, OPTION_NAMES, LossOptions

# Options that come from the model or from each call, with the reason given when passed to patch().
_NOT_PATCH_KWARGS = {
    "softcap": "it is read from the model config (final_logit_softcapping)",
    "bias": "it is the head's own bias",
    "shift": "labels are shifted as Hugging Face shifts them (pass shift_labels= to the forward to give "
             "pre-shifted targets)",
    "num_items_in_batch": "it is a per-batch value; Trainer passes it to the forward",
    "token_weights": "they are per-batch; pass token_weights= (shaped like labels) to the forward",
    "return_stats": "the model output has no field for them; call dk.linear_cross_entropy yourself for stats",
    "input": "the patched forward supplies it", "weight": "the patched forward supplies it",
    "target": "the patched forward supplies it",
}
# Options of dk.linear_cross_entropy that dk.patch accepts once for every call: all but the above.
PATCH_LOSS_KWARGS = tuple(n for n in OPTION_NAMES if n != "objective" and n not in _NOT_PATCH_KWARGS)
# compute_loss_func works on the model's logits (no weight) and must return the Trainer's scalar loss.
COMPUTE_LOSS_KWARGS = tuple(n for n in PATCH_LOSS_KWARGS if n not in LINEAR_ONLY_OPTIONS and n != "reduction")


def check_loss_kwargs(loss_kwargs: dict, objective: ObjectiveLike = "dft", *, allowed=PATCH_LOSS_KWARGS,
                      caller: str = "dk.patch()") -> dict:
    """Check ``loss_kwargs`` as ``dk.patch(model, objective, **loss_kwargs)`` would (names, then values
    with :class:`~dft_kernels.options.LossOptions`); returns them as a new dict.  ``TypeError`` for
    a name ``caller`` does not take, ``TypeError``/``ValueError`` naming the option for a bad value."""
    if not isinstance(loss_kwargs, dict):
        raise TypeError(f"loss_kwargs must be a mapping of option name to value, got {type(loss_kwargs).__name__}")
    for key in loss_kwargs:
        if key in _NOT_PATCH_KWARGS and key not in allowed:
            raise TypeError(f"{caller} does not take {key!r}: {_NOT_PATCH_KWARGS[key]}")
        if key not in allowed:
            raise TypeError(f"{caller} got an unexpected keyword argument {key!r}; loss options are "
                            f"{', '.join(allowed)}")
    LossOptions(objective=objective, **loss_kwargs)
    return dict(loss_kwargs)
