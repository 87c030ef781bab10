"""The harness the trainer smoke tests share; it runs inside each trainer's virtual environment.

A smoke module (``integration/smoke_<trainer>.py``) defines ``NAME``, ``DIST`` (its pip
distribution), ``prepare(work)`` (write its configs into the work folder) and ``run(kind, work)``
(train, ``kind`` being ``"ours"`` or ``"theirs"``; returns extra facts to check), and ends with
``common.main(sys.modules[__name__])``.  Optional ``EXTRA_RUNS``: more kinds ``run`` takes (each
in its own process, returning ``{"ok": bool, "detail": str}``), e.g. a check that a
configuration bypassing the dft_kernels loss raises.  Optional ``PAIRS``: ``{name: (ours_kind,
theirs_kind)}``, more comparisons of two training runs (e.g. LLaMA-Factory's ``use_asft_loss`` through
ours and through LLaMA-Factory), checked as "ours" and "theirs" are except for the float64 DFT
reference (those losses are not DFT; tests/integrations/ compare them with float64 re-derivations).

``python -m integration.smoke_<trainer> --out result.json`` then

1. writes a tiny random Llama model (vocab 1024, float32) with a word-level tokenizer and a
   tiny prompt/completion dataset into a temporary folder (nothing from a hub);
2. runs the trainer twice, each in a fresh process, from the same files and seed, for
   ``STEPS`` optimizer steps of ``GA`` micro-batches: "ours" (the dft_kernels integration) and
   "theirs" (the trainer's own DFT loss).  ``transformers.Trainer.training_step`` is wrapped to
   record each micro-batch of the first step, the parameters before it, and, under a dispatch
   mode, the largest tensor any op produced in each micro-batch's forward and backward;
3. checks: the same first-step batches and parameters in both runs; the logged step-1 loss of
   ours equals theirs and the float64 reference (``dk.reference``) within ``TOL``; ours never
   produced a tensor of ``supervised tokens x vocab`` elements in any micro-batch (the smallest
   logits tensor a loss on the full vocabulary could make, smaller than ``positions x vocab``;
   and the recorder did see the chunk logits);
   every micro-batch of ours ran through the fused loss (the patch's call counter, and the
   integration's ``FusedLossCheck``);
4. writes the result (``status`` "pass" or "fail" with the reasons, the losses, the versions,
   the wall time) as JSON for ``integration/run.py``.
"""

from __future__ import annotations

import argparse
import functools
import hashlib
import json
import os
import random
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))  # dispatch_recorder

V, H = 1024, 16            # vocab >> hidden, so tokens x vocab is the largest tensor a run could make
STEPS, GA, BS = 3, 2, 2    # optimizer steps, gradient accumulation, micro-batch size
ROWS = STEPS * GA * BS + 4
LR, SEED = 5e-3, 1234
DATA_WORDS = 32           # the dataset uses words w4 .. w35 only, and their lm_head rows are larger
HEAD_STD = (0.3, 1.0)      # lm_head init std: other rows, those rows (logits of std ~1.2 and ~4), so the
                           # target probabilities (DFT's weights) spread over 1e-7 .. 1e-1 and beyond
CHUNK = 8                  # dk chunk size: the chunk logits (CHUNK x V) must show up in the recorder
OBJECTIVE = "dft"
TOL = 1e-5                 # float32 relative error (docs/design.md, Tests)
LATER_TOL = 1e-3           # steps 2..: AdamW amplifies float32 gradient noise near zero (a sanity check of gradients)
SPECIAL = ["<pad>", "<bos>", "<eos>", "<unk>"]


# ------------------------------------------------------------------ tiny model and data


def word(i: int) -> str:
    return f"w{i}"


def write_model(path: Path, seed: int = SEED) -> None:
    """A 2-layer random Llama (float32; small-init backbone, head of std ``HEAD_STD``) and a
    word-level tokenizer ``<pad> <bos> <eos> <unk> w4 ... w1023``; another ``seed`` gives another
    model of the same shape (a reference or teacher model)."""
    import torch
    import transformers
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from tokenizers.pre_tokenizers import WhitespaceSplit

    vocab = {tok: i for i, tok in enumerate(SPECIAL)}
    vocab.update({word(i): i for i in range(len(SPECIAL), V)})
    tok = Tokenizer(WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = WhitespaceSplit()
    tokenizer = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<bos>",
                                                     eos_token="<eos>", unk_token="<unk>")
    tokenizer.model_max_length = 256
    cfg = transformers.LlamaConfig(vocab_size=V, hidden_size=H, intermediate_size=32, num_hidden_layers=2,
                                   num_attention_heads=2, num_key_value_heads=1, initializer_range=0.05,
                                   max_position_embeddings=256, pad_token_id=0, bos_token_id=1, eos_token_id=2,
                                   tie_word_embeddings=False)
    torch.manual_seed(seed)
    model = transformers.LlamaForCausalLM(cfg).float()
    with torch.no_grad():  # so the DFT weights p vary (a small-init head gives p ~ 1/V for every target)
        model.lm_head.weight.normal_(0.0, HEAD_STD[0])
        model.lm_head.weight[len(SPECIAL):len(SPECIAL) + DATA_WORDS].normal_(0.0, HEAD_STD[1])
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)


def rows(n: int = ROWS) -> list[dict]:
    """Prompt/completion pairs of random words among the first ``DATA_WORDS`` (deterministic), of varying
    lengths."""
    rng = random.Random(SEED)

    def text(lo, hi):
        return " ".join(word(rng.randrange(len(SPECIAL), len(SPECIAL) + DATA_WORDS))
                        for _ in range(rng.randint(lo, hi)))

    return [{"prompt": text(6, 14), "completion": text(14, 30)} for _ in range(n)]


def write_jsonl(items: list[dict], path: Path) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in items))


# ------------------------------------------------------------------ recording a run

RECORDER = None  # the StepRecorder of this process's run (set by the driver before module.run)


class StepRecorder:
    """Wraps ``transformers.Trainer.training_step`` (every trainer here calls it for each micro-batch)."""

    def __init__(self):
        self.trainer = None
        self.params = None          # state dict before the first optimizer step
        self.first_step = []        # micro-batches of the first optimizer step
        self.largest = []           # per micro-batch: largest tensor (elements) produced in forward + backward
        self.largest_op = []
        self.tokens = []            # per micro-batch: batch x sequence positions
        self.supervised = []        # per micro-batch: positions with a (next-token) label != -100
        self.chunk_logits_seen = [] # per micro-batch: a tensor of CHUNK x V elements was produced

    def install(self) -> None:
        import torch
        import transformers

        from dispatch_recorder import LargestOutput

        original = transformers.Trainer.training_step
        rec = self

        @functools.wraps(original)
        def training_step(trainer, model, inputs, *args, **kwargs):
            rec.trainer = trainer
            if rec.params is None:
                rec.params = {k: v.detach().to("cpu", copy=True) for k, v in trainer.model.state_dict().items()}
            if trainer.state.global_step == 0:
                nib = args[0] if args else kwargs.get("num_items_in_batch")
                rec.first_step.append({
                    "inputs": {k: v.detach().to("cpu", copy=True) for k, v in inputs.items()
                               if isinstance(v, torch.Tensor)},
                    "num_items_in_batch": None if nib is None else int(nib)})
            rec.tokens.append(int(inputs["input_ids"].numel()))
            labels = inputs.get("labels")
            rec.supervised.append(int((labels[..., 1:] != -100).sum()) if isinstance(labels, torch.Tensor)
                                  else rec.tokens[-1])
            mode = LargestOutput()
            with mode:
                out = original(trainer, model, inputs, *args, **kwargs)
            rec.largest.append(mode.largest)
            rec.largest_op.append(str(mode.largest_op))
            rec.chunk_logits_seen.append(any(n == CHUNK * V for n, _ in mode.sizes))
            mode.sizes.clear()
            return out

        transformers.Trainer.training_step = training_step

    def logged_losses(self) -> list[float]:
        return [float(h["loss"]) for h in self.trainer.state.log_history if "loss" in h]

    def params_digest(self) -> str:
        import torch

        h = hashlib.sha256()
        for k in sorted(self.params):
            h.update(k.encode())
            h.update(self.params[k].contiguous().view(-1).view(dtype=torch.uint8).numpy().tobytes())
        return h.hexdigest()

    def reference_step1(self, model_dir: Path) -> float:
        """float64 reference of the logged step-1 loss, from the recorded batches and parameters."""
        import torch
        import transformers

        import dft_kernels as dk

        cfg = transformers.AutoConfig.from_pretrained(model_dir)
        model = transformers.AutoModelForCausalLM.from_config(cfg).double().eval()
        model.load_state_dict({k: v.double() for k, v in self.params.items()})
        total, means, count = torch.zeros((), dtype=torch.float64), [], 0
        for mb in self.first_step:
            x = mb["inputs"]
            fwd = {k: x[k] for k in ("input_ids", "attention_mask", "position_ids") if k in x}
            with torch.no_grad():
                logits = model(**fwd).logits
            s = dk.reference.cross_entropy(logits, x["labels"], objective=OBJECTIVE, shift=True, reduction="sum")
            n = int((x["labels"][:, 1:] != -100).sum())
            total, count = total + s, count + n
            means.append(s / max(n, 1))
        nibs = {mb["num_items_in_batch"] for mb in self.first_step}
        if None in nibs:  # no token-count normalisation: the trainer averages the micro-batch means
            return float(sum(means) / len(means))
        if nibs != {count}:
            raise AssertionError(f"num_items_in_batch {sorted(nibs)} != the step's valid tokens {count}")
        return float(total / count)

    def summary(self) -> dict:
        return {
            "logged_losses": self.logged_losses(),
            "global_step": int(self.trainer.state.global_step),
            "first_step": [{"input_ids": mb["inputs"]["input_ids"].tolist(),
                            "labels": mb["inputs"]["labels"].tolist() if "labels" in mb["inputs"] else None,
                            "num_items_in_batch": mb["num_items_in_batch"]} for mb in self.first_step],
            "params_sha256": self.params_digest(),
            "largest": self.largest, "largest_op": self.largest_op, "tokens": self.tokens,
            "supervised": self.supervised,
            "chunk_logits_seen": self.chunk_logits_seen,
        }


def versions(*dists: str) -> dict:
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for d in dists:
        try:
            out[d] = version(d)
        except PackageNotFoundError:
            out[d] = None
    return out


# ------------------------------------------------------------------ checks


def rel_err(a: float, b: float) -> float:
    return abs(a - b) / max(abs(b), 1e-30)


def check(ours: dict, theirs: dict, reference: bool = True) -> list[str]:
    """The reasons the comparison fails (empty when it passes); ``reference``: also against the float64
    DFT reference of ours' step 1."""
    bad = []
    for name, r in (("ours", ours), ("theirs", theirs)):
        if r.get("error"):
            bad.append(f"{name} run failed: {r['error']}")
    if bad:
        return bad
    for name, r in (("ours", ours), ("theirs", theirs)):
        if r["global_step"] != STEPS or len(r["logged_losses"]) != STEPS:
            bad.append(f"{name}: {r['global_step']} steps, {len(r['logged_losses'])} logged losses (want {STEPS})")
        if len(r["first_step"]) != GA:
            bad.append(f"{name}: {len(r['first_step'])} micro-batches in step 1 (want {GA})")
    if bad:
        return bad
    if ours["params_sha256"] != theirs["params_sha256"]:
        bad.append("the parameters before step 1 differ between the two runs")
    for i, (a, b) in enumerate(zip(ours["first_step"], theirs["first_step"])):
        if a["input_ids"] != b["input_ids"] or a["labels"] != b["labels"]:
            bad.append(f"micro-batch {i} of step 1 differs between the two runs")
    o, t, ref = ours["logged_losses"][0], theirs["logged_losses"][0], ours.get("reference_step1")
    if not rel_err(o, t) <= TOL:
        bad.append(f"step-1 loss ours {o!r} vs theirs {t!r}: relative error {rel_err(o, t):.2e} > {TOL:g}")
    if reference and not rel_err(o, ref) <= TOL:
        bad.append(f"step-1 loss ours {o!r} vs float64 reference {ref!r}: relative error {rel_err(o, ref):.2e}")
    n_by_v = min(ours["supervised"]) * V
    if not max(ours["largest"]) < n_by_v:
        i = ours["largest"].index(max(ours["largest"]))
        bad.append(f"ours produced a tensor of {max(ours['largest'])} elements ({ours['largest_op'][i]}) >= "
                   f"supervised tokens x vocab = {n_by_v}")
    if not all(ours["chunk_logits_seen"]):
        bad.append(f"the recorder did not see the chunk logits ({CHUNK} x {V} elements) in every micro-batch")
    later = [rel_err(a, b) for a, b in zip(ours["logged_losses"][1:], theirs["logged_losses"][1:])]
    if not max(later, default=0.0) <= LATER_TOL:
        bad.append(f"losses of steps 2..{STEPS} (after optimizer steps on ours' and theirs' gradients) differ: "
                   f"relative errors {[f'{e:.1e}' for e in later]} > {LATER_TOL:g}")
    if ours.get("fused_calls") != STEPS * GA:
        bad.append(f"the patched model's fused loss ran {ours.get('fused_calls')} times (want {STEPS * GA})")
    if ours.get("checked_micro_batches", STEPS * GA) != STEPS * GA:  # absent: the integration has no such check
        bad.append(f"FusedLossCheck checked {ours.get('checked_micro_batches')} micro-batches (want {STEPS * GA})")
    return bad


# ------------------------------------------------------------------ driver


def _run_one(module, kind: str, work: Path, out: Path) -> None:
    """In a fresh process: train once (``kind``) under the recorder and write what was seen."""
    global RECORDER
    t0 = time.perf_counter()
    rec = RECORDER = StepRecorder()
    rec.install()
    result: dict = {"kind": kind}
    try:
        extra = module.run(kind, work) or {}
        if kind in ("ours", "theirs") or any(kind in pair for pair in getattr(module, "PAIRS", {}).values()):
            result.update(rec.summary())
        result.update(extra)
        if kind == "ours":
            result["reference_step1"] = rec.reference_step1(work / "model")
    except BaseException as e:  # noqa: BLE001 - reported to the driver, which fails the test
        result["error"] = f"{type(e).__name__}: {e}"
        result["traceback"] = traceback.format_exc()
    result["wall_s"] = time.perf_counter() - t0
    out.write_text(json.dumps(result))


def _spawn(module, kind: str, work: Path, timeout: float) -> dict:
    out = work / f"{kind}.json"
    cmd = [sys.executable, "-m", module.__spec__.name, "--run", kind, "--work", str(work), "--out", str(out)]
    log = work / f"{kind}.log"
    with open(log, "w") as f:
        try:
            proc = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, timeout=timeout, cwd=str(ROOT))
        except subprocess.TimeoutExpired:
            return {"error": f"timed out after {timeout:.0f} s (log: {log})"}
    if not out.exists():
        tail = log.read_text()[-3000:]
        return {"error": f"exit code {proc.returncode} without a result; log tail:\n{tail}"}
    return json.loads(out.read_text())


def main(module) -> None:
    parser = argparse.ArgumentParser(description=f"{module.NAME} smoke test of the dft_kernels integration")
    parser.add_argument("--out", type=Path, required=True)
    pair_kinds = [kind for pair in getattr(module, "PAIRS", {}).values() for kind in pair]
    parser.add_argument("--run", choices=["ours", "theirs", *getattr(module, "EXTRA_RUNS", ()), *pair_kinds])
    parser.add_argument("--work", type=Path)
    parser.add_argument("--keep", action="store_true", help="keep the work folder (printed)")
    parser.add_argument("--timeout", type=float, default=900.0, help="seconds per training run")
    a = parser.parse_args()
    if a.run:
        _run_one(module, a.run, a.work, a.out)
        return

    t0 = time.perf_counter()
    work = Path(tempfile.mkdtemp(prefix=f"dk-smoke-{module.NAME}-"))
    result = {"trainer": module.NAME, "versions": versions(module.DIST, "transformers", "torch", "trl"),
              "work": str(work)}
    try:
        write_model(work / "model")
        module.prepare(work)
        ours = _spawn(module, "ours", work, a.timeout)
        theirs = _spawn(module, "theirs", work, a.timeout)
        reasons = check(ours, theirs)
        extra = {kind: _spawn(module, kind, work, a.timeout) for kind in getattr(module, "EXTRA_RUNS", ())}
        for kind, r in extra.items():
            if not r.get("ok"):
                reasons.append(f"{kind}: {r.get('error') or r.get('detail')}")
        pairs = {}
        for name, (ours_kind, theirs_kind) in getattr(module, "PAIRS", {}).items():
            pa, pb = _spawn(module, ours_kind, work, a.timeout), _spawn(module, theirs_kind, work, a.timeout)
            why = check(pa, pb, reference=False)
            reasons.extend(f"{name}: {r}" for r in why)
            pairs[name] = {
                "status": "pass" if not why else "fail", "reasons": why,
                "ours": pa.get("logged_losses"), "theirs": pb.get("logged_losses"),
                "ours_largest": max(pa.get("largest") or [0]), "theirs_largest": max(pb.get("largest") or [0]),
                "tokens_x_vocab": min(pa.get("supervised") or [0]) * V,
                "fused_calls": pa.get("fused_calls"), "checked_micro_batches": pa.get("checked_micro_batches"),
                "run_wall_s": {"ours": pa.get("wall_s"), "theirs": pb.get("wall_s")},
                "detail": pa.get("detail"),
                "tracebacks": {k: r["traceback"] for k, r in (("ours", pa), ("theirs", pb)) if "traceback" in r}}
        result.update({
            "status": "pass" if not reasons else "fail", "reasons": reasons,
            "ours": ours.get("logged_losses"), "theirs": theirs.get("logged_losses"),
            "reference_step1": ours.get("reference_step1"),
            "ours_largest": max(ours.get("largest") or [0]), "theirs_largest": max(theirs.get("largest") or [0]),
            "tokens_x_vocab": min(ours.get("supervised") or [0]) * V,
            "fused_calls": ours.get("fused_calls"), "checked_micro_batches": ours.get("checked_micro_batches"),
            "run_wall_s": {"ours": ours.get("wall_s"), "theirs": theirs.get("wall_s")},
            "extra_runs": {k: r.get("detail") for k, r in extra.items()},
            "pairs": pairs,
            "tracebacks": {k: r["traceback"] for k, r in (("ours", ours), ("theirs", theirs)) if "traceback" in r},
        })
    except BaseException as e:  # noqa: BLE001
        result.update(status="fail", reasons=[f"{type(e).__name__}: {e}"], traceback=traceback.format_exc())
    result["wall_s"] = time.perf_counter() - t0
    a.out.write_text(json.dumps(result, indent=1))
    print(json.dumps({k: v for k, v in result.items() if k != "tracebacks"}, indent=1))
    if not a.keep and result["status"] == "pass":
        import shutil

        shutil.rmtree(work, ignore_errors=True)
    raise SystemExit(0 if result["status"] == "pass" else 1)


def env_for_runs() -> dict:
    """Environment of the training processes: offline, no trackers."""
    env = dict(os.environ)
    env.update(HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TRANSFORMERS_OFFLINE="1", WANDB_MODE="disabled",
               WANDB_DISABLED="true", DO_NOT_TRACK="1", TOKENIZERS_PARALLELISM="false")
    return env
