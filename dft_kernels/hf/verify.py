"""Self-verification: the patched loss must see the logits the model's own forward computes."""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..objectives import get_objective
from .forward import _STATE_ATTR, _head_operands, _PatchState, _run_in_head, _signature
from .inspection import PatchError, _backbone, _check_head, _describe, _unwrap, head_spec


def _params_materialised(model) -> Optional[str]:
    for name, p in model.named_parameters():
        if p.device.type == "meta":
            return f"parameter {name} is on the meta device"
        if hasattr(p, "ds_id") or hasattr(p, "ds_numel"):
            return f"parameter {name} is partitioned by DeepSpeed ZeRO-3"
        try:
            from torch.distributed.tensor import DTensor
            if isinstance(p, DTensor):
                return f"parameter {name} is a sharded DTensor"
        except Exception:  # noqa: BLE001
            pass
    return None


def _verification_ids(model, head: nn.Linear, seq_len: int = 8) -> Tensor:
    emb = model.get_input_embeddings() if callable(getattr(model, "get_input_embeddings", None)) else None
    vocab = head.weight.shape[0]
    if isinstance(emb, nn.Embedding):
        vocab = min(vocab, emb.num_embeddings)
    device = emb.weight.device if isinstance(emb, nn.Embedding) else head.weight.device
    g = torch.Generator(device="cpu").manual_seed(1234)  # never touches the global RNG
    return torch.randint(0, vocab, (1, seq_len), generator=g).to(device)


def _compare(model, state: _PatchState, head: nn.Linear, ids: Tensor) -> float:
    ref = state.call_original(model, input_ids=ids, use_cache=False, return_dict=True).logits
    hidden = _backbone(model)(input_ids=ids, use_cache=False)
    hidden = hidden.last_hidden_state if hasattr(hidden, "last_hidden_state") else hidden[0]

    def logits_of(h: Tensor) -> Tensor:
        x, w, b = _head_operands(head, h, state.spec)
        z = F.linear(x, w, b)
        return z if state.spec.softcap is None else state.spec.softcap * torch.tanh(z / state.spec.softcap)

    ours = _run_in_head(head, hidden, logits_of)
    if ours.shape != ref.shape:
        return float("inf")
    ref64, ours64 = ref.double(), ours.to(ref.device).double()
    denom = ref64.norm()
    return float((ours64 - ref64).norm() / denom) if denom > 0 else float(ours64.norm())


def verify_patch(model, *, amplify: bool = True) -> None:
    """Check numerically that the patched loss sees the same logits as ``model``'s own forward.

    Runs the original forward and the backbone + head transform on a short random sequence in
    eval mode without gradients (the global RNG and the training flags are left as they were),
    once as is and, when ``amplify``, once with the head weight multiplied by 2**6 in place
    (exactly undone afterwards), so that logits are large enough for a softcap or any other
    nonlinearity to show.  Raises :class:`PatchError` naming the model type on a mismatch.
    """
    model = _unwrap(model)
    state = model.__dict__.get(_STATE_ATTR)
    if state is None:
        state = _PatchState(get_objective("dft"), {}, head_spec(model), model.__dict__.get("forward"),
                            signature=_signature(model))
    head = _check_head(model)
    modes = {m: m.training for m in model.modules()}
    dtype = head.weight.dtype
    tol = 1e-4 if dtype in (torch.float32, torch.float64) else 3e-2
    factor = 2.0 ** 6
    try:
        model.eval()
        with torch.no_grad():
            ids = _verification_ids(model, head)
            errors = [_compare(model, state, head, ids)]
            w = head.weight
            if amplify and type(w) is nn.Parameter and w.device.type != "meta":
                w.mul_(factor)
                try:
                    errors.append(_compare(model, state, head, ids))
                finally:
                    w.div_(factor)
    finally:
        for m, mode in modes.items():
            m.training = mode
    worst = max(errors)
    if not worst <= tol:
        raise PatchError(
            f"{_describe(model)}: the logits the patch would use (backbone -> head weight/bias, {state.spec.note}) "
            f"differ from the model's own forward (relative error {worst:.2e} > {tol:g}); the model's forward "
            "transforms its logits in a way dk.patch does not know, so the patched loss would be wrong. "
            "Not patching. (verify=False skips this check at your own risk.)")
