"""The embedded demo's data and tokenizer, generated inside the package (nothing is downloaded).

Data: chains of additions and subtractions with a step-by-step solution in the
NuminaMath-CoT ``problem``/``solution`` format, the answer in ``\\boxed{}``::

    {"problem": "Compute 47+25-18.", "solution": "47+25=72\\n72-18=54\\nThe answer is \\\\boxed{54}."}

The train split mixes chains of ``train_terms`` terms (2-4); the held-out split is harder than
the average training problem: only the longest chains (``heldout_terms``, 4 terms), none of which
occur in the train split.  Generation is
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

__all__ = ["make_problem", "make_split", "write_demo_data", "build_tokenizer", "CHAT_TEMPLATE", "SPECIAL_TOKENS"]

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
