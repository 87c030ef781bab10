"""TRL's GRPOTrainer with its per-token log-probs and entropy from dk.linear_logprobs (DFTGRPOTrainer)
against the stock GRPOTrainer (TRL's own fused LM head), on CPU, tiny random Llama, no vLLM.

Both trainers start from the same weights and seed, so they generate the same completions (the
test checks it: every completion the reward function sees is recorded) and the first optimizer
step differs only in how the head computes the log-probs and the entropy.  The step-1 loss, the
gradient norm and the entropy metric are compared; the entropy bonus is on, so the entropy's
gradient is part of the step.
"""

from __future__ import annotations

import copy

import pytest
import torch

transformers = pytest.importorskip("transformers")
trl = pytest.importorskip("trl")
datasets = pytest.importorskip("datasets")

from trainer_helpers import tiny_llama, word_tokenizer  # noqa: E402

from dft_kernels.integrations.trl import DFTGRPOTrainer, FusedCausalLMOutput, add_logprob_head  # noqa: E402

# The fused LM head these trainers use exists from TRL 1.15, which needs Python >= 3.11; on Python
# 3.10 pip resolves TRL 1.14 (tests/integrations/test_integrations.py checks the error named there).
pytestmark = pytest.mark.skipif(FusedCausalLMOutput is None,
                                reason=f"TRL {trl.__version__} has no fused LM head (TRL >= 1.15, Python >= 3.11)")

SEED = 1234
TEMPERATURE = 0.7
# Both heads compute the same float32 quantities (per-token log-probs and entropy over V = 61 from
# the same hidden states), differing only in summation order: each is within a few float32 ulps
# (~1e-7 relative) of the exact value, and the backbone's backward is the same float32 code on the
# two heads' gradients.  1e-5 leaves two orders of magnitude for that reordering and no room for a
# wrong temperature, a dropped entropy gradient or a shifted label (each changes these by > 1e-2).
REL_TOL = 1e-5


def prompts():
    g = torch.Generator().manual_seed(0)
    rows = []
    for _ in range(4):
        n = int(torch.randint(2, 6, (), generator=g))
        rows.append(" ".join(f"w{int(i)}" for i in torch.randint(3, 61, (n,), generator=g)))
    return datasets.Dataset.from_dict({"prompt": rows})


def recording_reward(seen):
    def reward(prompts, completions, completion_ids, **kwargs):
        seen.append([list(ids) for ids in completion_ids])
        return [float(sum(ids) % 5) for ids in completion_ids]   # deterministic, varies within a group
    return reward


def grpo_args(tmp_path, **extra):
    return trl.GRPOConfig(
        output_dir=str(tmp_path), per_device_train_batch_size=4, num_generations=4, max_completion_length=6,
        max_steps=1, learning_rate=1e-3, logging_steps=1, save_strategy="no", report_to=[], use_cpu=True,
        dataloader_num_workers=0, disable_tqdm=True, seed=SEED, temperature=TEMPERATURE, entropy_coef=0.05,
        bf16=False, beta=0.0, **extra)


def run_step(cls, model, tmp_path, seen, **extra):
    trainer = cls(model=model, reward_funcs=recording_reward(seen), args=grpo_args(tmp_path, **extra),
                  train_dataset=prompts(), processing_class=word_tokenizer())
    trainer.train()
    logs = [h for h in trainer.state.log_history if "loss" in h]
    assert trainer.state.global_step == 1 and len(logs) == 1
    return trainer, logs[0]


def rel(a, b):
    return abs(a - b) / max(abs(b), 1e-30)


@pytest.fixture
def count_trl_head(monkeypatch):
    """Counts the calls of TRL's own chunked log-prob function (its fused LM head)."""
    import trl.trainer.utils as tu

    calls = {"n": 0}
    original = tu._ChunkedLogProbFunction.apply

    def counted(*args, **kwargs):
        calls["n"] += 1
        return original(*args, **kwargs)
    monkeypatch.setattr(tu._ChunkedLogProbFunction, "apply", counted)
    return calls


def test_grpo_step1_matches_trl_own_head(tmp_path, count_trl_head):
    torch.manual_seed(0)
    base = tiny_llama()
    seen_trl, seen_ours = [], []
    _, theirs = run_step(trl.GRPOTrainer, copy.deepcopy(base), tmp_path / "trl", seen_trl)
    trl_calls = count_trl_head["n"]
    assert trl_calls >= 1
    model = copy.deepcopy(base)
    trainer, ours = run_step(DFTGRPOTrainer, model, tmp_path / "ours", seen_ours)
    assert count_trl_head["n"] == trl_calls, "TRL's head ran inside DFTGRPOTrainer"
    assert model.dft_kernels_logprob_calls >= 1
    # the same completions were scored, so step 1 is the same problem for both heads
    assert seen_ours == seen_trl and len(seen_trl) >= 1
    print(f"\nstep-1 loss: ours {ours['loss']!r} theirs {theirs['loss']!r} "
          f"(rel {rel(ours['loss'], theirs['loss']):.2e})"
          f"\nstep-1 grad_norm: ours {ours['grad_norm']!r} theirs {theirs['grad_norm']!r} "
          f"(rel {rel(ours['grad_norm'], theirs['grad_norm']):.2e})"
          f"\nentropy: ours {ours['entropy']!r} theirs {theirs['entropy']!r}")
    assert theirs["grad_norm"] > 0 and theirs["entropy"] > 0
    for key in ("loss", "grad_norm", "entropy"):
        assert rel(ours[key], theirs[key]) <= REL_TOL, (key, ours[key], theirs[key])


def test_grpo_temperature_reaches_the_head(tmp_path):
    """A head at the wrong temperature gives another entropy: the comparison above can fail."""
    torch.manual_seed(0)
    base = tiny_llama()
    batch = torch.randint(3, 61, (2, 7))
    labels = batch.clone()
    labels[:, :3] = -100
    got = {}
    for t in (TEMPERATURE, 1.0):
        m = copy.deepcopy(base)
        add_logprob_head(m, temperature=t)
        out = m(input_ids=batch, labels=labels, fused_lm_head=True)
        got[t] = out
        with torch.no_grad():
            logits = base(input_ids=batch).logits[:, :-1].double() / t
        logp = torch.log_softmax(logits, -1)
        want_lp = logp.gather(-1, batch[:, 1:, None]).squeeze(-1) * (labels[:, 1:] != -100)
        want_h = -(logp.exp() * logp).sum(-1) * (labels[:, 1:] != -100)
        assert torch.allclose(out.log_probs.double(), want_lp, rtol=0, atol=1e-5)
        assert torch.allclose(out.entropy.double(), want_h, rtol=0, atol=1e-5)
        assert torch.equal(out.label_mask, labels[:, 1:] != -100)
    assert (got[TEMPERATURE].entropy - got[1.0].entropy).abs().max() > 1e-2


def test_grpo_refusals(tmp_path):
    with pytest.raises(ValueError, match="logprob_kwargs.*temperature"):
        add_logprob_head(tiny_llama(), logprob_kwargs={"temperature": 2.0})
    m = tiny_llama()
    m.config.logit_scale = 0.5
    with pytest.raises(ValueError, match="logit_scale=0.5"):
        add_logprob_head(m)


def test_head_gradients_match_trl_head():
    """Per token and per parameter, on one batch: our head against TRL's (log-probs, entropy and the
    gradient of a loss using both), each float32 within float32 reordering of the other."""
    from trl.trainer.utils import add_fused_lm_head

    torch.manual_seed(0)
    base = tiny_llama()
    theirs, ours = copy.deepcopy(base), copy.deepcopy(base)
    add_fused_lm_head(theirs, temperature=TEMPERATURE, outputs=("log_probs", "entropy"))
    add_logprob_head(ours, temperature=TEMPERATURE)
    ids = torch.randint(3, 61, (4, 12))
    labels = ids.clone()
    labels[:, :4] = -100
    outs = [m(input_ids=ids, labels=labels, fused_lm_head=True) for m in (theirs, ours)]
    for key in ("log_probs", "entropy"):
        a, b = getattr(outs[0], key), getattr(outs[1], key)
        assert (a - b).abs().max() <= REL_TOL * a.abs().max(), key
    adv = torch.randn(4, 1)
    for out in outs:
        (-(adv * out.log_probs).sum() - 0.3 * out.entropy.sum()).backward()
    g = [torch.cat([p.grad.flatten() for p in m.parameters()]) for m in (theirs, ours)]
    assert g[0].norm() > 0
    assert (g[0] - g[1]).norm() <= REL_TOL * g[0].norm()
    assert torch.equal(outs[0].label_mask, outs[1].label_mask)
    assert torch.allclose(outs[0].loss, outs[1].loss, rtol=REL_TOL, atol=0)
