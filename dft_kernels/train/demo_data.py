"""The embedded demo's data and tokenizer, generated inside the package (nothing is downloaded).

Data: chains of additions and subtractions with a step-by-step solution in the
NuminaMath-CoT ``problem``/``solution`` format, the answer in ``\\boxed{}``::

    {"problem": "Compute 47+25-18.", "solution": "47+25=72\\n72-18=54\\nThe answer is \\\\boxed{54}."}

``write_demo_suite`` writes the demo's four disjoint splits (see ``SUITE``): a broad warm-start
set (2-4 terms, the "pretraining"), a fine-tuning set of demonstrations from its harder part
(3-4 terms), and two held-out sets no training split contains: easy (3 terms) and hard (4 terms).
``write_demo_data`` writes a plain train/held-out pair (used by the tests).  Generation is
deterministic in ``seed`` (``random.Random``), so every machine builds the same files.

Tokenizer: character level, built with the ``tokenizers`` library (a BPE model with no merges
over printable ASCII, so every character is its own token), ChatML-style special tokens and a chat
template, wrapped as a ``transformers.PreTrainedTokenizerFast``.
"""

from __future__ import annotations

import json
import os
import random
import string
from typing import Iterable

__all__ = ["make_problem", "make_split", "make_split_by_terms", "write_demo_data", "write_demo_suite", "SUITE",
           "target_kinds", "build_tokenizer", "CHAT_TEMPLATE", "SPECIAL_TOKENS"]

SPECIAL_TOKENS = ["<pad>", "<unk>", "<|im_start|>", "<|im_end|>"]

# ChatML-style and prefix-consistent: rendering messages[:i] with add_generation_prompt=True is a
# prefix of rendering messages[:i+1], which is what the response masking relies on.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def make_problem(rng: random.Random, num_terms: int, max_operand: int = 9) -> dict:
    """One chain ``a1 op a2 op ... an`` with non-negative running totals and its worked solution."""
    total = rng.randint(1, max_operand)
    text = str(total)
    steps = []
    for _ in range(num_terms - 1):
        b = rng.randint(1, max_operand)
        if b <= total and rng.random() < 0.5:
            new, op = total - b, "-"
        else:
            new, op = total + b, "+"
        steps.append(f"{total}{op}{b}={new}")
        text += f"{op}{b}"
        total = new
    solution = "\n".join(steps) + f"\nThe answer is \\boxed{{{total}}}."
    return {"problem": f"Compute {text}.", "solution": solution, "answer": str(total)}


def make_split(seed: int, n: int, terms: Iterable[int], exclude: set | None = None,
               max_operand: int = 9) -> list[dict]:
    """``n`` distinct problems with a number of terms drawn uniformly from ``terms``."""
    rng = random.Random(seed)
    terms = list(terms)
    seen = set(exclude or ())
    out = []
    attempts = 0
    while len(out) < n:
        attempts += 1
        if attempts > 100 * n:
            raise RuntimeError(f"could not draw {n} distinct problems with terms={terms}")
        ex = make_problem(rng, rng.choice(terms), max_operand)
        if ex["problem"] in seen:
            continue
        seen.add(ex["problem"])
        out.append(ex)
    return out


def make_split_by_terms(seed: int, counts: dict, exclude: set | None = None, max_operand: int = 9) -> list[dict]:
    """Distinct problems with exactly ``counts[k]`` chains of ``k`` terms (shuffled together).  A count
    of -1 takes every chain of that length not in ``exclude`` (only sensible for 2 terms: 126 exist)."""
    rng = random.Random(seed)
    seen = set(exclude or ())
    out = []
    for terms, n in sorted(counts.items()):
        if n == -1:
            if terms != 2 or max_operand != 9:
                raise ValueError(f"counts: -1 (all problems) is only supported for 2-term chains, got {terms}")
            ex = [_two_term(a, op, b) for a in range(1, 10) for b in range(1, 10) for op in "+-" if op == "+" or b <= a]
            out += [e for e in ex if e["problem"] not in seen]
            seen.update(e["problem"] for e in ex)
            continue
        got, attempts = 0, 0
        while got < n:
            attempts += 1
            if attempts > 200 * n:
                raise RuntimeError(f"could not draw {n} distinct {terms}-term problems")
            ex = make_problem(rng, terms, max_operand)
            if ex["problem"] in seen:
                continue
            seen.add(ex["problem"])
            out.append(ex)
            got += 1
    rng.shuffle(out)
    return out


def _two_term(a: int, op: str, b: int) -> dict:
    c = a + b if op == "+" else a - b
    return {"problem": f"Compute {a}{op}{b}.", "solution": f"{a}{op}{b}={c}\nThe answer is \\boxed{{{c}}}.",
            "answer": str(c)}


def _write_jsonl(path: str, rows: list[dict]) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")
    os.replace(tmp, path)


def write_demo_data(out_dir: str, *, seed: int = 0, n_train: int = 4000, n_heldout: int = 200,
                    train_terms=(2, 3, 4), heldout_terms=(4,), max_operand: int = 9) -> dict:
    """Write ``train.jsonl`` and ``heldout.jsonl`` under ``out_dir``; returns their paths."""
    os.makedirs(out_dir, exist_ok=True)
    train = make_split(seed, n_train, train_terms, max_operand=max_operand)
    heldout = make_split(seed + 1, n_heldout, heldout_terms, exclude={r["problem"] for r in train},
                         max_operand=max_operand)
    paths = {"train": os.path.join(out_dir, "train.jsonl"), "heldout": os.path.join(out_dir, "heldout.jsonl")}
    _write_jsonl(paths["train"], train)
    _write_jsonl(paths["heldout"], heldout)
    return paths


# the demo's splits: {name: (seed offset, {terms: count})}; drawn in this order, each excluding all before it.
# There are 126 distinct 2-term, 1899 3-term and 30036 4-term chains (one-digit operands).
SUITE = {
    "heldout_hard": (1, {4: 200}),
    "heldout_easy": (2, {3: 200}),
    "warmstart": (3, {2: -1, 3: 900, 4: 1800}),
    "finetune": (4, {3: 600, 4: 2400}),
}


def write_demo_suite(out_dir: str, *, seed: int = 0, n_heldout: int = 200) -> dict:
    """Write the demo's splits (``SUITE``) as ``<name>.jsonl`` under ``out_dir``; returns their paths.
    The splits share no problem.  ``n_heldout`` resizes both held-out sets."""
    os.makedirs(out_dir, exist_ok=True)
    seen: set = set()
    paths = {}
    for name, (offset, counts) in SUITE.items():
        if name.startswith("heldout"):
            counts = {k: n_heldout for k in counts}
        rows = make_split_by_terms(seed * 100 + offset, counts, exclude=seen)
        seen.update(r["problem"] for r in rows)
        paths[name] = os.path.join(out_dir, f"{name}.jsonl")
        _write_jsonl(paths[name], rows)
    return paths


def target_kinds(tokenizer, rows) -> str:
    """One letter per learned target token of ``rows`` (``data.Row``, in the order of
    ``evaluate.target_token_probs``): ``r`` for a digit of a step's result (``12`` in
    ``7+5=12``, the arithmetic the model has to get right), ``o`` for every other token (operands
    copied from the problem or the previous line, operators, the answer sentence, end of turn)."""
    kinds = []
    for r in rows:
        toks = tokenizer.convert_ids_to_tokens(r.input_ids)
        line = ""
        for t, tok in enumerate(toks):
            if t > 0 and r.labels[t] != -100:
                kinds.append("r" if tok.isdigit() and "=" in line and "boxed" not in line else "o")
            line = "" if tok == "\n" else line + tok
    return "".join(kinds)


def build_tokenizer(save_dir: str | None = None):
    """A character-level ``PreTrainedTokenizerFast`` with a chat template, built locally."""
    from tokenizers import Tokenizer, decoders, models
    from transformers import PreTrainedTokenizerFast

    chars = [c for c in string.printable if c not in "\t\r\x0b\x0c"]  # digits, letters, punctuation, space, \n
    vocab = {tok: i for i, tok in enumerate(SPECIAL_TOKENS + chars)}
    # BPE without merges and without a pre-tokenizer: every character is one token
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    tok.decoder = decoders.Fuse()
    tok.add_special_tokens(SPECIAL_TOKENS)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", unk_token="<unk>", eos_token="<|im_end|>",
        additional_special_tokens=["<|im_start|>"], chat_template=CHAT_TEMPLATE,
        clean_up_tokenization_spaces=False)
    if save_dir is not None:
        os.makedirs(save_dir, exist_ok=True)
        fast.save_pretrained(save_dir)
    return fast
