"""TRL's GKDTrainer (trl.experimental.gkd) with its generalized JSD loss from dk.linear_distill on the
student's and the teacher's hidden states (DFTGKDTrainer) against the stock GKDTrainer (the same loss on
both models' full logits), on CPU, tiny random Llamas (the teacher another random model), same weights
and seed.

Off-policy steps (lmbda=0: the dataset's completions) for three betas, and an on-policy step (lmbda=1: the
student samples the completions, TRL's generation unchanged in ours): the logged step-1 loss and gradient
norm agree within 1e-5 relative; the teacher never builds its logits and is never modified; a float64
re-derivation of TRL's formula checks the step-1 value independently.
"""

from __future__ import annotations

import copy
import os

import pytest
import torch
import torch.nn.functional as F

transformers = pytest.importorskip("transformers")
trl = pytest.importorskip("trl")
datasets = pytest.importorskip("datasets")
os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
gkd = pytest.importorskip("trl.experimental.gkd")

from trainer_helpers import V, pad_collate, tiny_llama, token_rows, word_tokenizer  # noqa: E402

from dft_kernels.integrations import trl as dk_trl  # noqa: E402

SEED = 4321
GA, BS = 2, 2
# Both losses are float32 over V = 61 from the same hidden states (differing in summation order, a few
# ulps); a wrong beta, mask or shift changes them by > 1e-2.
REL_TOL = 1e-5


def rel(a, b):
    return abs(a - b) / max(abs(b), 1e-30)


def models():
    torch.manual_seed(0)
    student = tiny_llama()
    torch.manual_seed(1)
    teacher = tiny_llama()
    return student, teacher


def dataset():
    torch.manual_seed(2)
    rows = token_rows(GA * BS)
    prompt_len = max(r["labels"].count(-100) for r in rows)
    # prompts for on-policy generation: the first prompt_len tokens, left-padded as TRL's collator does
    return rows, prompt_len


def collate(rows):
    batch = pad_collate(rows)
    n = max(r["labels"].count(-100) for r in rows)
    prompts = torch.zeros(len(rows), n, dtype=torch.long)
    mask = torch.zeros(len(rows), n, dtype=torch.long)
    for i, r in enumerate(rows):
        k = r["labels"].count(-100)
        prompts[i, n - k:] = torch.tensor(r["input_ids"][:k])
        mask[i, n - k:] = 1
    return {**batch, "prompts": prompts, "prompt_attention_mask": mask}


def args(tmp_path, beta, lmbda):
    return gkd.GKDConfig(
        output_dir=str(tmp_path), per_device_train_batch_size=BS, gradient_accumulation_steps=GA, max_steps=1,
        learning_rate=1e-3, logging_steps=1, save_strategy="no", report_to=[], use_cpu=True,
        dataloader_num_workers=0, disable_tqdm=True, seed=SEED, bf16=False, beta=beta, lmbda=lmbda,
        temperature=0.9, max_new_tokens=5, max_length=None, max_grad_norm=1e9)


def run(cls, tmp_path, beta, lmbda, **extra):
    student, teacher = models()
    init, teacher_init = copy.deepcopy(student.state_dict()), copy.deepcopy(teacher.state_dict())
    rows, _ = dataset()
    seen, collated = [], []

    def collate_and_record(features):
        batch = collate(features)
        collated.append(batch)
        return batch

    def record(module, a, kw):
        if module.training and torch.is_grad_enabled() and "input_ids" in kw:
            seen.append({k: kw[k].detach().clone() for k in ("input_ids", "attention_mask")})

    student.register_forward_pre_hook(record, with_kwargs=True)
    teacher_head_calls = []
    teacher.lm_head.register_forward_hook(lambda *a: teacher_head_calls.append(1))
    import random
    random.seed(SEED)
    trainer = cls(model=student, teacher_model=teacher, args=args(tmp_path, beta, lmbda),
                  train_dataset=datasets.Dataset.from_list(rows), data_collator=collate_and_record,
                  processing_class=word_tokenizer(), **extra)
    trainer.train()
    log = next(h for h in trainer.state.log_history if "loss" in h)
    assert all(torch.equal(v, teacher_init[k]) for k, v in teacher.state_dict().items())
    return {"loss": float(log["loss"]), "grad_norm": float(log["grad_norm"]), "seen": seen, "init": init,
            "teacher_init": teacher_init, "teacher_head_calls": len(teacher_head_calls), "trainer": trainer,
            "batches": collated[:GA]}


def trl_jsd64(student_state, teacher_state, batches, beta):
    """TRL's generalized_jsd_loss, re-derived in float64 on the full logits, over the step's micro-batches
    (sum over valid next-token positions / the step's valid tokens)."""
    s, t = tiny_llama().double(), tiny_llama().double().eval()
    s.load_state_dict({k: v.double() for k, v in student_state.items()})
    t.load_state_dict({k: v.double() for k, v in teacher_state.items()})
    total, count = torch.zeros((), dtype=torch.float64), 0
    for b in batches:
        zs = s(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits[:, :-1]
        with torch.no_grad():
            zt = t(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits[:, :-1]
        valid = b["labels"][:, 1:] != -100
        ls, lt = zs[valid].log_softmax(-1), zt[valid].log_softmax(-1)
        if beta == 0:
            div = (lt.exp() * (lt - ls)).sum(-1)
        elif beta == 1:
            div = (ls.exp() * (ls - lt)).sum(-1)
        else:
            m = torch.logsumexp(torch.stack([ls + torch.log1p(torch.tensor(-beta, dtype=torch.float64)),
                                             lt + torch.log(torch.tensor(beta, dtype=torch.float64))]), dim=0)
            div = beta * (lt.exp() * (lt - m)).sum(-1) + (1 - beta) * (ls.exp() * (ls - m)).sum(-1)
        total, count = total + div.sum(), count + int(valid.sum())
    return float((total / count).detach())


@pytest.mark.parametrize("beta", [0.0, 0.5, 1.0])
def test_gkd_step_matches_trl(tmp_path, beta):
    ours = run(dk_trl.DFTGKDTrainer, tmp_path / "ours", beta, 0.0, dft_distill_kwargs={"chunk_size": 8})
    theirs = run(gkd.GKDTrainer, tmp_path / "theirs", beta, 0.0)
    assert ours["teacher_head_calls"] == 0 and theirs["teacher_head_calls"] > 0
    assert ours["trainer"].dft_kernels_student.dft_kernels_distill_calls == GA
    assert len(ours["seen"]) == len(theirs["seen"]) == GA
    for a, b in zip(ours["seen"], theirs["seen"]):
        assert torch.equal(a["input_ids"], b["input_ids"])
    assert rel(ours["loss"], theirs["loss"]) <= REL_TOL, (ours["loss"], theirs["loss"])
    assert rel(ours["grad_norm"], theirs["grad_norm"]) <= REL_TOL, (ours["grad_norm"], theirs["grad_norm"])
    batches = ours["batches"]
    for b, s in zip(batches, ours["seen"]):
        assert torch.equal(b["input_ids"], s["input_ids"])
    want = trl_jsd64(ours["init"], ours["teacher_init"], batches, beta)
    assert rel(ours["loss"], want) <= REL_TOL, (ours["loss"], want)
    print(f"beta={beta}: loss ours {ours['loss']!r} theirs {theirs['loss']!r} float64 {want!r}; grad norm ours "
          f"{ours['grad_norm']!r} theirs {theirs['grad_norm']!r}")


def test_gkd_on_policy_step_matches_trl(tmp_path):
    """lmbda=1: the student generates the completions (TRL's generation, the forward the model had)."""
    ours = run(dk_trl.DFTGKDTrainer, tmp_path / "ours", 0.5, 1.0)
    theirs = run(gkd.GKDTrainer, tmp_path / "theirs", 0.5, 1.0)
    for a, b in zip(ours["seen"], theirs["seen"]):
        assert torch.equal(a["input_ids"], b["input_ids"])
    # the trained sequences are the student's samples, not the dataset's
    assert not torch.equal(ours["seen"][0]["input_ids"], ours["batches"][0]["input_ids"])
    assert ours["teacher_head_calls"] == 0
    assert rel(ours["loss"], theirs["loss"]) <= REL_TOL, (ours["loss"], theirs["loss"])
    assert rel(ours["grad_norm"], theirs["grad_norm"]) <= REL_TOL, (ours["grad_norm"], theirs["grad_norm"])
    print(f"on-policy: loss ours {ours['loss']!r} theirs {theirs['loss']!r}; grad norm ours {ours['grad_norm']!r} "
          f"theirs {theirs['grad_norm']!r}")


def test_distill_kwargs_errors_name_the_key(tmp_path):
    with pytest.raises(ValueError, match="beta"):
        dk_trl.add_distill_head(tiny_llama(), beta=0.3)


def test_teacher_with_softcapped_logits_refused(tmp_path):
    student, _ = models()
    cfg = transformers.Gemma2Config(vocab_size=V, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                    num_attention_heads=2, num_key_value_heads=1, head_dim=16,
                                    final_logit_softcapping=30.0)
    teacher = transformers.Gemma2ForCausalLM(cfg)
    rows, _ = dataset()
    with pytest.raises(ValueError, match="teacher model's config scales or softcaps"):
        dk_trl.DFTGKDTrainer(model=student, teacher_model=teacher, args=args(tmp_path, 0.5, 0.0),
                             train_dataset=datasets.Dataset.from_list(rows), data_collator=collate,
                             processing_class=word_tokenizer())


def test_reference_formula_agrees_with_trl_function():
    """The float64 re-derivation above is TRL's generalized_jsd_loss (on one batch of logits, float64)."""
    g = torch.Generator().manual_seed(3)
    zs, zt = torch.randn(2, 5, V, generator=g, dtype=torch.float64), torch.randn(2, 5, V, generator=g,
                                                                                 dtype=torch.float64)
    labels = torch.randint(0, V, (2, 5), generator=g)
    labels[0, :2] = -100
    for beta in (0.0, 0.3, 1.0):
        theirs = gkd.GKDTrainer.generalized_jsd_loss(zs, zt, labels=labels, beta=beta)
        valid = labels != -100
        ls, lt = F.log_softmax(zs[valid], -1), F.log_softmax(zt[valid], -1)
        if beta == 0:
            mine = (lt.exp() * (lt - ls)).sum(-1).mean()
        elif beta == 1:
            mine = (ls.exp() * (ls - lt)).sum(-1).mean()
        else:
            m = torch.logsumexp(torch.stack([ls + torch.log1p(torch.tensor(-beta, dtype=torch.float64)),
                                             lt + torch.log(torch.tensor(beta, dtype=torch.float64))]), dim=0)
            mine = (beta * (lt.exp() * (lt - m)).sum(-1) + (1 - beta) * (ls.exp() * (ls - m)).sum(-1)).mean()
        assert abs(float(theirs) - float(mine)) <= 1e-12
