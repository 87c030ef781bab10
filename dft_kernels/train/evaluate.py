"""Held-out evaluation: greedy generation, answer extraction, exact match."""

from __future__ import annotations

import torch

from .answers import extract_answer, is_match, normalize_answer

__all__ = ["extract_answer", "normalize_answer", "is_match", "generate_answers", "evaluate", "target_token_probs"]


@torch.no_grad()
def generate_answers(model, tokenizer, prompts: list, *, max_new_tokens: int, batch_size: int,
                     device, autocast_ctx, temperature: float = 0.0, num_samples: int = 1) -> list[str]:
    """Completions of chat ``prompts`` (left-padded batches): greedy when ``temperature`` is 0,
    else ``num_samples`` samples per prompt from the full softmax at ``temperature`` (no top-k or
    top-p truncation), returned prompt by prompt (``num_samples`` consecutive entries each)."""
    if temperature < 0 or num_samples < 1 or (temperature == 0 and num_samples != 1):
        raise ValueError(f"temperature/num_samples: got {temperature}/{num_samples}; greedy decoding "
                         "(temperature 0) gives one completion per prompt")
    sampling = (dict(do_sample=True, temperature=temperature, top_k=0, top_p=1.0, num_return_sequences=num_samples)
                if temperature > 0 else dict(do_sample=False))
    side = tokenizer.padding_side
    tokenizer.padding_side = "left"
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    outs = []
    try:
        for i in range(0, len(prompts), batch_size):
            texts = [tokenizer.apply_chat_template(p, tokenize=False, add_generation_prompt=True)
                     for p in prompts[i:i + batch_size]]
            enc = tokenizer(texts, add_special_tokens=False, padding=True, return_tensors="pt").to(device)
            with autocast_ctx():
                gen = model.generate(**enc, max_new_tokens=max_new_tokens, num_beams=1, **sampling,
                                     pad_token_id=pad_id, eos_token_id=tokenizer.eos_token_id,
                                     use_cache=True)
            new = gen[:, enc["input_ids"].shape[1]:]
            outs += tokenizer.batch_decode(new, skip_special_tokens=True)
    finally:
        tokenizer.padding_side = side
    return outs


def evaluate(model, tokenizer, examples, *, max_new_tokens: int, batch_size: int, device, autocast_ctx,
             rank: int = 0, world: int = 1, shard: bool = True):
    """Exact-match accuracy over ``examples``: returns ``(correct, total, samples)`` for this rank's
    share (``shard=True``: rank r takes examples r, r+W, ...; FSDP passes ``shard=False`` so every
    rank runs the same forwards)."""
    mine = examples[rank::world] if shard else examples
    was_training = model.training
    model.eval()
    try:
        completions = generate_answers(model, tokenizer, [e.prompt for e in mine], max_new_tokens=max_new_tokens,
                                       batch_size=batch_size, device=device, autocast_ctx=autocast_ctx)
    finally:
        model.train(was_training)
    correct, samples = 0, []
    for ex, out in zip(mine, completions):
        pred = extract_answer(out)
        ok = is_match(pred, ex.answer)
        correct += int(ok)
        if len(samples) < 3:
            samples.append({"where": ex.where, "completion": out, "prediction": pred, "answer": ex.answer,
                            "correct": ok})
    return correct, len(mine), samples


@torch.no_grad()
def target_token_probs(model, rows, *, pad_token_id: int, batch_size: int = 64) -> torch.Tensor:
    """Probability the model gives each training target token: ``exp(-nll)`` per learned token of
    ``rows`` (``data.Row``), float32, in row order.  The per-token NLL is
    ``dk.linear_cross_entropy(h, W, labels, objective="ce", reduction="none", shift=True)`` on the
    decoder's final hidden states, so no ``[tokens x vocab]`` logits are materialised."""
    from ..functional import linear_cross_entropy
    from .data import IGNORE_INDEX, collate

    was_training = model.training
    model.eval()
    head = model.get_output_embeddings()
    out = []
    try:
        for i in range(0, len(rows), batch_size):
            batch = collate(rows[i:i + batch_size], pad_token_id)
            hidden = model.get_decoder()(input_ids=batch["input_ids"], position_ids=batch["position_ids"],
                                         use_cache=False).last_hidden_state
            nll = linear_cross_entropy(hidden, head.weight, batch["labels"], bias=getattr(head, "bias", None),
                                       objective="ce", reduction="none", shift=True)
            shifted = batch["labels"][:, 1:]
            out.append(torch.exp(-nll[:, :shifted.shape[1]][shifted != IGNORE_INDEX]).float())
    finally:
        model.train(was_training)
    return torch.cat(out) if out else torch.zeros(0)
