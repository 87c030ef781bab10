"""Training and held-out data: load local JSONL/JSON/Parquet through ``datasets``, apply the chat
template, mask the prompt to -100, truncate, optionally pack, and plan batches deterministically.

Every problem with the data raises :class:`DataError` naming the file and line (``path:line``;
``path:row N`` for Parquet, which has no lines).
"""

from __future__ import annotations

import json
import os
import random
from dataclasses import dataclass
from typing import Optional, Sequence

import torch

__all__ = ["DataError", "Example", "EvalExample", "load_records", "to_messages", "tokenize_messages",
           "load_train_examples", "load_eval_examples", "pack_examples", "collate", "BatchPlan",
           "IGNORE_INDEX"]

IGNORE_INDEX = -100
ROLES = ("system", "user", "assistant", "tool")


class DataError(ValueError):
    """Bad training or evaluation data; the message starts with ``file:line``."""


@dataclass
class Example:
    input_ids: list
    labels: list
    where: str          # "file:line" of the source record


@dataclass
class EvalExample:
    prompt: list        # chat messages up to (not including) the reference answer
    answer: str         # reference answer (the ``answer`` field, or extracted from the response)
    where: str


# ----------------------------------------------------------------------------------------- reading

def _kind(path: str) -> str:
    low = path.lower()
    for ext, kind in ((".jsonl", "jsonl"), (".json", "json"), (".parquet", "parquet")):
        if low.endswith(ext):
            return kind
    raise DataError(f"{path}: unsupported file type; expected .jsonl, .json or .parquet")


def _json_locations(path: str) -> tuple[list[str], Optional[str]]:
    """``file:line`` of every record, and the first JSON error found (with its line), if any.

    Handles JSON Lines and a JSON array (or an object of the same shape per line, as
    ``datasets`` accepts both in a ``.json`` file).
    """
    with open(path, encoding="utf-8") as f:
        text = f.read()
    stripped = text.lstrip()
    if stripped.startswith("["):
        dec = json.JSONDecoder()
        try:
            dec.decode(text)
        except json.JSONDecodeError as e:
            return [], f"{path}:{e.lineno}: malformed JSON: {e.msg} (column {e.colno})"
        # line of each array element
        locs, pos = [], text.index("[") + 1
        while True:
            while pos < len(text) and text[pos] in " \t\r\n,":
                pos += 1
            if pos >= len(text) or text[pos] == "]":
                break
            locs.append(f"{path}:{text.count(chr(10), 0, pos) + 1}")
            _, pos = dec.raw_decode(text, pos)
        return locs, None
    locs = []
    for lineno, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            return locs, f"{path}:{lineno}: malformed JSON: {e.msg} (column {e.colno})"
        if not isinstance(obj, dict):
            return locs, f"{path}:{lineno}: each line must be a JSON object, got {type(obj).__name__}"
        locs.append(f"{path}:{lineno}")
    return locs, None


def load_records(path: str):
    """Load a local data file through ``datasets``; returns ``(dataset, locations)``."""
    import datasets

    if not os.path.isfile(path):
        raise DataError(f"{path}: file not found")
    kind = _kind(path)
    if os.path.getsize(path) == 0:
        raise DataError(f"{path}:1: empty data set (the file is empty)")
    datasets.disable_progress_bars()
    if kind == "parquet":
        try:
            ds = datasets.Dataset.from_parquet(path, keep_in_memory=True)
        except Exception as e:  # pyarrow raises many types; name the file
            raise DataError(f"{path}: cannot read Parquet: {e}") from None
        locs = [f"{path}:row {i}" for i in range(len(ds))]
    else:
        locs, err = _json_locations(path)
        if err is not None:
            raise DataError(err)
        if not locs:
            raise DataError(f"{path}:1: empty data set (no records)")
        try:
            ds = datasets.Dataset.from_json(path, keep_in_memory=True)
        except Exception as e:  # e.g. a field that is a list in one record and a string in another
            cause = e.__cause__ or e.__context__ or e
            raise DataError(f"{path}: datasets could not load the file: {cause}") from None
        if len(ds) != len(locs):
            raise DataError(f"{path}: datasets read {len(ds)} records but the file has {len(locs)}")
    if len(ds) == 0:
        raise DataError(f"{path}:1: empty data set (no records)")
    return ds, locs


# ------------------------------------------------------------------------------------------ format

def detect_format(columns: Sequence[str], path: str, requested: str = "auto") -> str:
    if requested != "auto":
        return requested
    cols = set(columns)
    if "messages" in cols:
        return "messages"
    if {"prompt", "completion"} <= cols:
        return "prompt_completion"
    if {"problem", "solution"} <= cols:
        return "problem_solution"
    raise DataError(f"{path}:1: cannot tell the data format from the fields {sorted(cols)}; expected "
                    "'messages', 'prompt'+'completion', or 'problem'+'solution' (NuminaMath-CoT)")


def _need_str(rec: dict, key: str, where: str) -> str:
    v = rec.get(key)
    if v is None:
        raise DataError(f"{where}: missing field {key!r}")
    if not isinstance(v, str):
        raise DataError(f"{where}: field {key!r} must be a string, got {type(v).__name__}")
    return v


def to_messages(rec: dict, fmt: str, where: str, system_prompt: Optional[str] = None) -> list:
    """One record -> chat messages ending with an assistant turn."""
    if fmt == "messages":
        msgs = rec.get("messages")
        if msgs is None:
            raise DataError(f"{where}: missing field 'messages'")
        if not isinstance(msgs, list) or not msgs:
            raise DataError(f"{where}: 'messages' must be a non-empty list of {{role, content}} objects")
        out = []
        for j, m in enumerate(msgs):
            if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
                raise DataError(f"{where}: messages[{j}] must be an object with string 'role' and 'content'")
            if m["role"] not in ROLES:
                raise DataError(f"{where}: messages[{j}] has unknown role {m['role']!r}; expected one of {ROLES}")
            out.append({"role": m["role"], "content": m["content"]})
        if not any(m["role"] == "assistant" for m in out):
            raise DataError(f"{where}: 'messages' has no assistant turn, so there is nothing to learn")
        msgs = out
    elif fmt == "prompt_completion":
        msgs = [{"role": "user", "content": _need_str(rec, "prompt", where)},
                {"role": "assistant", "content": _need_str(rec, "completion", where)}]
    elif fmt == "problem_solution":
        msgs = [{"role": "user", "content": _need_str(rec, "problem", where)},
                {"role": "assistant", "content": _need_str(rec, "solution", where)}]
    else:
        raise DataError(f"{where}: unknown data format {fmt!r}")
    if system_prompt is not None and msgs[0]["role"] != "system":
        msgs = [{"role": "system", "content": system_prompt}] + msgs
    return msgs


# -------------------------------------------------------------------------------------- tokenising

def render(tokenizer, messages: list, add_generation_prompt: bool = False) -> str:
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)


def render_with_spans(tokenizer, messages: list, where: str) -> tuple[str, list]:
    """The conversation rendered by the chat template, and the character spans of its assistant turns.

    A span runs from the end of the rendering of the turns before it with the generation prompt
    to the end of the rendering that includes it (so the end-of-turn token is learned too).
    """
    full = render(tokenizer, messages)
    spans = []
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        before = render(tokenizer, messages[:i], add_generation_prompt=True)
        upto = full if i == len(messages) - 1 else render(tokenizer, messages[:i + 1])
        if not (upto.startswith(before) and full.startswith(upto)):
            raise DataError(f"{where}: the chat template is not prefix-consistent (rendering the first turns "
                            "is not a prefix of rendering the whole conversation), so the prompt cannot be "
                            "masked; pass a suitable --chat_template")
        spans.append((len(before), len(upto)))
    return full, spans


def labels_from_offsets(ids: list, offsets: list, spans: list, max_length: int, where: str) -> Example:
    """Learned tokens are those that start inside an assistant span; then truncate and check."""
    labels = [t if any(a <= start < b for a, b in spans) else IGNORE_INDEX for t, (start, _) in zip(ids, offsets)]
    n_total = len(ids)
    ids, labels = list(ids[:max_length]), labels[:max_length]
    labels[0] = IGNORE_INDEX  # position 0 is never predicted (HF shifts labels by one)
    if all(t == IGNORE_INDEX for t in labels):
        if n_total > max_length:
            raise DataError(f"{where}: example has {n_total} tokens and nothing is left to learn after "
                            f"truncation to max_length={max_length}; raise --max_length or drop the example")
        raise DataError(f"{where}: example has no response tokens to learn")
    return Example(ids, labels, where)


def tokenize_messages(tokenizer, messages: list, max_length: int, where: str) -> Example:
    """Token ids and labels of one conversation: only assistant turns are learned, the rest is -100.

    The full text is tokenised once; a token is learned when it starts inside an assistant
    span (robust to merges at the boundary between prompt and response).
    """
    full, spans = render_with_spans(tokenizer, messages, where)
    enc = tokenizer(full, add_special_tokens=False, return_offsets_mapping=True)
    return labels_from_offsets(enc["input_ids"], enc["offset_mapping"], spans, max_length, where)


def resolve_chat_template(tokenizer, chat_template: Optional[str]) -> None:
    if chat_template is not None:
        if os.path.isfile(chat_template):
            with open(chat_template, encoding="utf-8") as f:
                chat_template = f.read()
        tokenizer.chat_template = chat_template
    if not getattr(tokenizer, "chat_template", None):
        raise DataError("tokenizer: it has no chat template; pass --chat_template (a jinja file or string)")


def load_train_examples(path: str, tokenizer, *, max_length: int, data_format: str = "auto",
                        system_prompt: Optional[str] = None, num_proc: int = 1) -> list[Example]:
    ds, locs = load_records(path)
    fmt = detect_format(ds.column_names, path, data_format)

    def tok(batch, indices):
        texts, spans = [], []
        for j, idx in enumerate(indices):
            rec = {k: batch[k][j] for k in batch}
            text, sp = render_with_spans(tokenizer, to_messages(rec, fmt, locs[idx], system_prompt), locs[idx])
            texts.append(text)
            spans.append(sp)
        enc = tokenizer(texts, add_special_tokens=False, return_offsets_mapping=True)
        exs = [labels_from_offsets(i, o, sp, max_length, locs[idx])
               for i, o, sp, idx in zip(enc["input_ids"], enc["offset_mapping"], spans, indices)]
        return {"input_ids": [e.input_ids for e in exs], "labels": [e.labels for e in exs]}

    out = ds.map(tok, with_indices=True, batched=True, batch_size=256, remove_columns=ds.column_names,
                 keep_in_memory=True, load_from_cache_file=False, num_proc=num_proc if num_proc > 1 else None)
    return [Example(r["input_ids"], r["labels"], locs[i]) for i, r in enumerate(out)]


def load_eval_examples(path: str, *, data_format: str = "auto", system_prompt: Optional[str] = None,
                       limit: int = 0) -> list[EvalExample]:
    from .answers import extract_answer

    ds, locs = load_records(path)
    fmt = detect_format(ds.column_names, path, data_format)
    has_answer = "answer" in ds.column_names
    out = []
    for i, rec in enumerate(ds):
        if limit and i >= limit:
            break
        msgs = to_messages(rec, fmt, locs[i], system_prompt)
        last = max(j for j, m in enumerate(msgs) if m["role"] == "assistant")
        if has_answer and rec.get("answer") is not None:
            answer = str(rec["answer"])
        else:
            answer = extract_answer(msgs[last]["content"])
            if answer is None:
                raise DataError(f"{locs[i]}: no reference answer: no 'answer' field and the response has "
                                "neither \\boxed{...} nor a number")
        out.append(EvalExample(msgs[:last], answer, locs[i]))
    return out


# ------------------------------------------------------------------------------- packing, batches

@dataclass
class Row:
    """One training sequence: one example, or several packed ones."""
    input_ids: list
    labels: list
    position_ids: list

    @property
    def num_targets(self) -> int:
        # labels are shifted by one inside the model: position 0 is never a target
        return sum(1 for t in self.labels[1:] if t != IGNORE_INDEX)


def single_rows(examples: list[Example]) -> list[Row]:
    return [Row(e.input_ids, e.labels, list(range(len(e.input_ids)))) for e in examples]


def pack_examples(examples: list[Example], max_length: int, seed: int) -> list[Row]:
    """Greedy packing in a seeded random order; position ids restart at 0 for every example,
    and the first token of each example is never a target, so no example learns from another."""
    order = list(range(len(examples)))
    random.Random(seed).shuffle(order)
    rows, cur = [], None
    for i in order:
        ex = examples[i]
        if cur is not None and len(cur.input_ids) + len(ex.input_ids) <= max_length:
            cur.input_ids += ex.input_ids
            cur.labels += [IGNORE_INDEX] + ex.labels[1:]
            cur.position_ids += list(range(len(ex.input_ids)))
        else:
            cur = Row(list(ex.input_ids), [IGNORE_INDEX] + ex.labels[1:], list(range(len(ex.input_ids))))
            rows.append(cur)
    return rows


def collate(rows: list[Row], pad_token_id: int) -> dict:
    """Right-pad to the longest row.  Padding is its own segment (position ids from 0, labels -100),
    so no attention mask is needed: transformers builds a block-diagonal causal mask from the
    position ids (sdpa/eager) or uses the varlen kernel (flash_attention_2)."""
    width = max(len(r.input_ids) for r in rows)
    ids, labels, pos = [], [], []
    for r in rows:
        pad = width - len(r.input_ids)
        ids.append(r.input_ids + [pad_token_id] * pad)
        labels.append(r.labels + [IGNORE_INDEX] * pad)
        pos.append(r.position_ids + list(range(pad)))
    return {"input_ids": torch.tensor(ids, dtype=torch.long), "labels": torch.tensor(labels, dtype=torch.long),
            "position_ids": torch.tensor(pos, dtype=torch.long)}


class BatchPlan:
    """Which rows every rank reads at every optimizer step, as a pure function of (seed, step).

    The order is a fresh ``torch.randperm`` per epoch seeded with ``seed + epoch``; an
    incomplete last global batch of an epoch is dropped.  Global batch = per-device batch x
    accumulation steps x world size; micro-batch ``m`` of step ``s`` is the contiguous slice
    ``m`` of the step's global batch, and rank ``r`` reads part ``r`` of it.  Hence one
    process with batch ``b*W`` sees the same micro-batches as ``W`` processes with batch ``b``,
    and resuming needs only the step number.
    """

    def __init__(self, num_rows: int, per_device_batch: int, accum: int, world: int, seed: int):
        self.num_rows, self.b, self.accum, self.world, self.seed = num_rows, per_device_batch, accum, world, seed
        self.global_batch = per_device_batch * accum * world
        self.steps_per_epoch = num_rows // self.global_batch
        if self.steps_per_epoch == 0:
            raise DataError(f"the training set has {num_rows} sequences, fewer than one global batch "
                            f"({per_device_batch} per device x {accum} accumulation x {world} ranks)")
        self._perm_epoch, self._perm = None, None

    def _perm_for(self, epoch: int) -> list:
        if self._perm_epoch != epoch:
            g = torch.Generator().manual_seed(self.seed + epoch)
            self._perm = torch.randperm(self.num_rows, generator=g).tolist()
            self._perm_epoch = epoch
        return self._perm

    def micro_batches(self, step: int, rank: int) -> list[list[int]]:
        """Row indices of this rank's ``accum`` micro-batches for optimizer step ``step`` (0-based)."""
        epoch, k = divmod(step, self.steps_per_epoch)
        perm = self._perm_for(epoch)
        base = k * self.global_batch
        per_micro = self.b * self.world
        return [perm[base + m * per_micro + rank * self.b: base + m * per_micro + (rank + 1) * self.b]
                for m in range(self.accum)]
