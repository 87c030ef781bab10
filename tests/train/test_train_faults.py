"""The trainer loses no work under faults (docs/trainer.md, Fault tolerance): SIGKILL at every stage of a
checkpoint save, corrupt and truncated checkpoint files, write errors from a real file-size limit and ENOSPC,
NaN from a real poisoned weight file, resumes with a changed config or data file, and FSDP2 resume.

Every continuation is compared bit for bit with one uninterrupted reference run (CPU, one thread,
deterministic algorithms): the same loss at every step and the same final weights."""

import errno
import json
import math
import os
import shutil
import subprocess
import sys

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("datasets")

from safetensors.torch import load_file  # noqa: E402

from dft_kernels.train import TrainConfig, train  # noqa: E402
from dft_kernels.train import checkpoint as ckpt  # noqa: E402
from dft_kernels.train.checkpoint import (  # noqa: E402
    CheckpointError,
    CheckpointSaveError,
    list_checkpoints,
    verify_checkpoint,
)
from dft_kernels.train.cli import main as cli_main  # noqa: E402
from dft_kernels.train.metrics import read_metrics  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
TINY = dict(model="tiny", tiny_hidden_size=32, tiny_num_layers=2, tiny_num_heads=2, tiny_num_kv_heads=1,
            tiny_intermediate_size=64, max_length=96, lr=2e-3, seed=1, progress_bar=False, plot=False)
# the reference run: 6 steps, a checkpoint every 2 (checkpoint-2, -4, -6 all kept)
RUN = dict(TINY, max_steps=6, per_device_batch_size=4, save_steps=2, save_total_limit=0)
STEPS = 6


@pytest.fixture(scope="module")
def ref(data, tmp_path_factory):
    """One uninterrupted run; tests copy its output directory before touching it."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        out = tmp_path_factory.mktemp("ref") / "run"
        summary = train(TrainConfig(**dict(RUN, train_file=data["train"], output_dir=str(out))))
    finally:
        torch.set_num_threads(n)
    assert [os.path.basename(p) for p in list_checkpoints(str(out))] == ["checkpoint-2", "checkpoint-4",
                                                                          "checkpoint-6"]
    assert len(summary["losses"]) == STEPS and all(math.isfinite(v) for v in summary["losses"])
    return {"dir": str(out), "losses": summary["losses"], "weights": weights(os.path.join(str(out), "checkpoint-6"))}


def cfg_dict(data, out, **kw):
    return dict(RUN, train_file=data["train"], output_dir=str(out), **kw)


def weights(ckpt_dir):
    return load_file(os.path.join(ckpt_dir, "model", "model.safetensors"))


def assert_same_weights(a, b):
    assert a.keys() == b.keys()
    for k in a:  # bitwise, NaN == NaN (the poisoned row of the non-finite tests)
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=0, equal_nan=True, msg=k)


def curve(out):
    return [r["loss"] for r in read_metrics(os.path.join(str(out), "metrics.jsonl")) if "loss" in r]


def hidden(out):
    return sorted(n for n in os.listdir(out) if n.startswith("."))


def assert_continues_bit_identically(out, ref):
    """The whole run's curve and final weights equal the uninterrupted run's: no completed work was lost
    and nothing was redone differently."""
    assert curve(out) == ref["losses"]
    final = list_checkpoints(str(out))[-1]
    assert final.endswith(f"checkpoint-{STEPS}")
    verify_checkpoint(final)
    assert_same_weights(weights(final), ref["weights"])


def run_driver(tmp_path, config: dict, *args, timeout=300):
    path = tmp_path / "config.json"
    path.write_text(json.dumps(config))
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=os.pathsep.join(sys.path))
    return subprocess.run([sys.executable, os.path.join(HERE, "train_fault_driver.py"), str(path), *args],
                          env=env, capture_output=True, text=True, timeout=timeout)


# ---------------------------------------------------------------------------- 1. SIGKILL mid-save

# where the save at step 4 is killed (save stage, how many times that stage was reached) -> (hidden
# leftovers, complete checkpoints right after the kill, the step the resume must continue from)
KILL_POINTS = {
    "model": ("model#2", [".tmp-checkpoint-4"], [2], 2),        # model + tokenizer written, no trainer state
    "state": ("state#2", [".tmp-checkpoint-4"], [2], 2),        # all files written, no manifest yet
    "manifest": ("manifest#2", [".tmp-checkpoint-4"], [2], 2),  # complete and verified, not yet renamed
    "prune": ("prune#1", [".trash-checkpoint-2"], [4], 4),      # renamed into place; the old one half removed
}


@pytest.mark.parametrize("stage", [*KILL_POINTS, "replace"])
def test_sigkill_during_save_resumes_from_last_complete_checkpoint(data, ref, tmp_path, capsys, one_thread, stage):
    out = tmp_path / "run"
    config = cfg_dict(data, out, save_total_limit=1)
    if stage == "replace":
        # an earlier run (stopped by SIGTERM at step 2) left checkpoint-2; a fresh run into the same
        # directory replaces it at step 2 and is killed between moving the old one aside and renaming
        # the new one in: neither carries the checkpoint's name at that moment
        proc = run_driver(tmp_path, config, "--sigterm-after", "1", "kill@replace#1")
        leftovers, before, expect = [".old-checkpoint-2", ".tmp-checkpoint-2"], [], 2
    else:
        where, leftovers, before, expect = KILL_POINTS[stage]
        proc = run_driver(tmp_path, config, f"kill@{where}")
    assert proc.returncode == -9, proc.stdout[-2000:] + proc.stderr[-3000:]  # really SIGKILLed
    assert f"save stage {stage} #" in proc.stdout.splitlines()[-1]
    assert hidden(out) == leftovers
    # the partial directory is never taken for a checkpoint
    assert [int(p.rsplit("-", 1)[1]) for p in list_checkpoints(str(out))] == before

    capsys.readouterr()
    summary = train(TrainConfig(**dict(config, resume="auto")))
    err = capsys.readouterr().err
    assert summary["steps"] == STEPS and summary["interrupted"] is None
    for name in leftovers:  # cleaned up, and said so
        assert os.path.join(str(out), name) in err
    assert hidden(out) == []
    assert len(summary["losses"]) == STEPS - expect  # resumed from the last complete checkpoint
    assert_continues_bit_identically(out, ref)


def test_metrics_line_cut_by_a_kill_is_dropped_on_resume(data, ref, tmp_path, capsys, one_thread):
    out = tmp_path / "run"
    shutil.copytree(ref["dir"], out)
    shutil.rmtree(out / "checkpoint-6")
    with open(out / "metrics.jsonl", "a") as f:
        f.write('{"step": 7, "loss": 0.1')  # a kill in the middle of appending a record
    train(TrainConfig(**cfg_dict(data, out, resume="auto")))
    assert "dropped a cut-off last line" in capsys.readouterr().err
    assert_continues_bit_identically(out, ref)


# ------------------------------------------------------------------ 2. corrupt or incomplete files

def test_manifest_refuses_corrupt_and_truncated_files_and_auto_falls_back(data, ref, tmp_path, capsys,
                                                                           one_thread):
    out = tmp_path / "run"
    shutil.copytree(ref["dir"], out)
    for c in list_checkpoints(str(out)):
        manifest = verify_checkpoint(c)
        assert manifest["files"]["model/model.safetensors"]["bytes"] > 0
        assert len(manifest["files"]["trainer_state.pt"]["sha256"]) == 64
    st6 = out / "checkpoint-6" / "model" / "model.safetensors"
    st6.write_bytes(st6.read_bytes()[:-100])  # truncated (e.g. a copy cut short)
    pt4 = out / "checkpoint-4" / "trainer_state.pt"
    raw = bytearray(pt4.read_bytes())
    raw[len(raw) // 2] ^= 0x01  # one flipped bit, same size
    pt4.write_bytes(bytes(raw))

    config = out.parent / "c.json"
    config.write_text(json.dumps(cfg_dict(data, out)))
    capsys.readouterr()
    for resume in (str(out / "checkpoint-6"), "latest"):  # explicit and latest: refused, file named
        assert cli_main(["--config", str(config), "--resume", resume]) == 2
        err = capsys.readouterr().err
        assert f"{st6}: truncated: " in err and "--resume auto falls back" in err, err
    with pytest.raises(CheckpointError, match=f"{pt4}: corrupt: sha256"):
        train(TrainConfig(**cfg_dict(data, out, resume=str(out / "checkpoint-4"))))
    os.remove(out / "checkpoint-2" / "manifest.json")
    with pytest.raises(CheckpointError, match="incomplete checkpoint: no manifest.json"):
        train(TrainConfig(**cfg_dict(data, out, resume=str(out / "checkpoint-2"))))
    assert [os.path.basename(p) for p in list_checkpoints(str(out))] == ["checkpoint-4", "checkpoint-6"]
    shutil.copy(os.path.join(ref["dir"], "checkpoint-2", "manifest.json"), out / "checkpoint-2")

    capsys.readouterr()
    summary = train(TrainConfig(**cfg_dict(data, out, resume="auto")))
    err = capsys.readouterr().err
    assert f"skipping a bad checkpoint: {st6}: truncated" in err
    assert f"skipping a bad checkpoint: {pt4}: corrupt" in err
    assert f"falling back to {out / 'checkpoint-2'}" in err
    assert len(summary["losses"]) == STEPS - 2
    assert_continues_bit_identically(out, ref)  # the bad checkpoints were rewritten by the continuation
    for c in list_checkpoints(str(out)):
        verify_checkpoint(c)


# --------------------------------------------------------------------------------- 3. write errors

def test_write_error_stops_and_leaves_previous_checkpoint_intact(data, ref, tmp_path, capsys, one_thread):
    """A real EFBIG from the kernel: RLIMIT_FSIZE drops below the model file's size at the 2nd save."""
    out = tmp_path / "run"
    config = cfg_dict(data, out, save_total_limit=1)
    proc = run_driver(tmp_path, config, "fsize=32768@begin#2")
    assert proc.returncode == 2, proc.stdout[-2000:] + proc.stderr[-3000:]
    err = proc.stderr
    assert f"could not write {out / 'checkpoint-4'}" in err and "File too large" in err, err
    assert f"the previous checkpoint {out / 'checkpoint-2'} is intact" in err
    assert "on_save_error=continue keeps training" in err
    assert hidden(out) == []  # the partial directory was removed at once
    assert [os.path.basename(p) for p in list_checkpoints(str(out))] == ["checkpoint-2"]
    verify_checkpoint(str(out / "checkpoint-2"))
    assert len(curve(out)) == 4

    summary = train(TrainConfig(**dict(config, resume="latest")))
    assert len(summary["losses"]) == STEPS - 2
    assert_continues_bit_identically(out, ref)


def test_write_error_with_continue_keeps_training(data, ref, tmp_path, one_thread):
    """on_save_error=continue: the failed save at step 4 is reported, training goes on, the save at
    step 6 (the limit lifted again) succeeds; the curve is the reference's."""
    out = tmp_path / "run"
    proc = run_driver(tmp_path, cfg_dict(data, out, on_save_error="continue"),
                      "fsize=32768@begin#2", "fsize=off@begin#3")
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert "checkpoint at step 4 failed" in proc.stderr and "File too large" in proc.stderr
    assert "training goes on and saves again at step 6" in proc.stderr
    (line,) = [ln for ln in proc.stdout.splitlines() if ln.startswith("dft-train: {")]
    summary = json.loads(line[len("dft-train: "):])
    assert summary["save_errors"] == 1 and summary["steps"] == STEPS
    assert hidden(out) == []
    assert [os.path.basename(p) for p in list_checkpoints(str(out))] == ["checkpoint-2", "checkpoint-6"]
    assert_continues_bit_identically(out, ref)


def test_enospc_during_save(data, ref, tmp_path, one_thread, monkeypatch):
    """ENOSPC raised inside the save (after the files, before the manifest) with on_save_error=stop."""
    def full(stage, path):
        if stage == "state" and path.endswith("checkpoint-4"):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), os.path.join(path, "trainer_state.pt"))

    monkeypatch.setattr(ckpt, "save_hook", full)
    out = tmp_path / "run"
    with pytest.raises(CheckpointSaveError) as e:
        train(TrainConfig(**cfg_dict(data, out)))
    msg = str(e.value)
    assert "checkpoint at step 4 failed, stopping" in msg and "No space left on device" in msg
    assert f"the previous checkpoint {out / 'checkpoint-2'} is intact" in msg
    assert hidden(out) == [] and [os.path.basename(p) for p in list_checkpoints(str(out))] == ["checkpoint-2"]
    verify_checkpoint(str(out / "checkpoint-2"))


# ------------------------------------------------------------------------- 4. non-finite guard

@pytest.fixture(scope="module")
def poisoned(data, tmp_path_factory):
    """A real model directory whose embedding row of 'Q' is NaN, and a train file where exactly one
    example (in the 2nd step's batch) contains a 'Q'."""
    from transformers import AutoModelForCausalLM

    from dft_kernels.train.data import BatchPlan
    from dft_kernels.train.demo_data import build_tokenizer
    from dft_kernels.train.model import _tiny_config

    root = tmp_path_factory.mktemp("poison")
    tok = build_tokenizer()
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(_tiny_config(TrainConfig(**TINY), tok))
    (q,) = tok("Q")["input_ids"]
    with torch.no_grad():
        model.get_input_embeddings().weight[q] = float("nan")
    model.save_pretrained(str(root / "model"))
    tok.save_pretrained(str(root / "model"))
    lines = open(data["train"]).read().splitlines()
    assert not any("Q" in ln for ln in lines)
    row = BatchPlan(len(lines), 4, 1, 1, TINY["seed"]).micro_batches(1, 0)[0][0]  # in step 2 (1-based)
    rec = json.loads(lines[row])
    rec["problem"] += " Q"
    lines[row] = json.dumps(rec)
    train_file = root / "train.jsonl"
    train_file.write_text("\n".join(lines) + "\n")
    return {"model": str(root / "model"), "train": str(train_file), "where": f"{train_file}:{row + 1}", "q": q}


def poison_cfg(poisoned, out, **kw):
    return dict(TINY, model=poisoned["model"], train_file=poisoned["train"], output_dir=str(out), max_steps=4,
                per_device_batch_size=4, save_total_limit=0, **kw)


def test_nonfinite_skip_skips_the_update_and_counts_it(poisoned, tmp_path, capsys, one_thread):
    out = tmp_path / "skip"
    summary = train(TrainConfig(**poison_cfg(poisoned, out, on_nonfinite="skip", save_steps=1)))
    err = capsys.readouterr().err
    assert "step 2: non-finite loss and gradient norm" in err and poisoned["where"] in err
    assert "update skipped (on_nonfinite=skip, 1 so far)" in err
    recs = read_metrics(str(out / "metrics.jsonl"))
    assert [r["nonfinite_steps"] for r in recs] == [0, 1, 1, 1]
    assert [bool(r.get("skipped")) for r in recs] == [False, True, False, False]
    assert math.isnan(recs[1]["loss"]) and all(math.isfinite(r["loss"]) for r in recs[2:])
    assert summary["nonfinite_steps"] == 1 and math.isfinite(summary["final_loss"])
    # the skipped step changed nothing; the NaN did not spread into any weight
    w1, w2, w4 = (weights(str(out / f"checkpoint-{s}")) for s in (1, 2, 4))
    assert_same_weights(w1, w2)
    q = poisoned["q"]
    for k, v in w4.items():
        if k == "model.embed_tokens.weight":  # the poisoned row itself stays NaN (it is never updated)
            assert torch.isnan(v[q]).all()
            v = torch.cat([v[:q], v[q + 1:]])
        assert torch.isfinite(v).all(), k
    assert not torch.equal(w4["lm_head.weight"], w2["lm_head.weight"])  # steps 3-4 did train


def test_nonfinite_stop_checkpoints_last_good_step_and_names_the_batch(poisoned, tmp_path, capsys, one_thread):
    out = tmp_path / "stop"
    config = tmp_path / "stop.json"
    config.write_text(json.dumps(poison_cfg(poisoned, out, save_steps=0)))
    assert cli_main(["--config", str(config)]) == 3  # on_nonfinite defaults to stop
    err = capsys.readouterr().err
    assert "step 2: non-finite loss" in err and poisoned["where"] in err
    assert f"the state after step 1 is saved in {out / 'checkpoint-1'}" in err
    assert [os.path.basename(p) for p in list_checkpoints(str(out))] == ["checkpoint-1"]
    verify_checkpoint(str(out / "checkpoint-1"))
    recs = read_metrics(str(out / "metrics.jsonl"))
    assert [r["step"] for r in recs] == [1, 2] and recs[1]["skipped"] and recs[1]["nonfinite_steps"] == 1

    # the stop lost nothing: resuming it with on_nonfinite=skip (a policy, not a config change)
    # gives exactly the run that skipped from the start
    train(TrainConfig(**poison_cfg(poisoned, out, save_steps=0, on_nonfinite="skip", resume="auto")))
    skip = train(TrainConfig(**poison_cfg(poisoned, tmp_path / "skip", save_steps=0, on_nonfinite="skip")))
    got = curve(out)
    assert len(got) == 4 and math.isnan(got[1]) and got[:1] + got[2:] == skip["losses"][:1] + skip["losses"][2:]
    assert_same_weights(weights(str(out / "checkpoint-4")), weights(skip["checkpoint"]))


# --------------------------------------------------------------------------------- 5. resume safety

def test_resume_refuses_changed_config_or_data_unless_forced(data, ref, tmp_path, capsys, one_thread):
    out = tmp_path / "run"
    shutil.copytree(ref["dir"], out)
    shutil.rmtree(out / "checkpoint-6")
    shutil.rmtree(out / "checkpoint-4")
    with pytest.raises(CheckpointError) as e:
        train(TrainConfig(**cfg_dict(data, out, resume="latest", lr=1e-3, objective="ce")))
    msg = str(e.value)
    assert "lr: 0.002 -> 0.001" in msg and "objective: 'dft' -> 'ce'" in msg and "--force_resume" in msg

    lines = open(data["train"]).read().splitlines()
    lines[5] = lines[5].replace("Compute", "Compute ", 1)  # an edited example, same number of rows
    edited = tmp_path / "edited.jsonl"
    edited.write_text("\n".join(lines) + "\n")
    with pytest.raises(CheckpointError, match=r"train_file: contents changed: .*train\.jsonl .* -> .*edited\.jsonl"):
        train(TrainConfig(**dict(cfg_dict(data, out, resume="latest"), train_file=str(edited))))
    with pytest.raises(CheckpointError, match="global batch: 4 -> 8"):
        train(TrainConfig(**cfg_dict(data, out, resume="latest", grad_accum_steps=2)))

    forced = tmp_path / "forced"
    shutil.copytree(out, forced)
    capsys.readouterr()
    summary = train(TrainConfig(**dict(cfg_dict(data, forced, resume="latest", force_resume=True),
                                       train_file=str(edited))))
    assert "--force_resume: resuming" in capsys.readouterr().err and summary["steps"] == STEPS

    # the same bytes under another path are the same data: accepted, and the continuation is exact
    moved = tmp_path / "moved.jsonl"
    shutil.copy(data["train"], moved)
    train(TrainConfig(**dict(cfg_dict(data, out, resume="latest", save_total_limit=3),
                             train_file=str(moved))))
    assert_continues_bit_identically(out, ref)


def test_resume_neutral_fields_exist():
    names = {f for f in TrainConfig.__dataclass_fields__}
    assert ckpt.RESUME_NEUTRAL_FIELDS <= names, ckpt.RESUME_NEUTRAL_FIELDS - names


def test_fsdp2_resume_is_exact(data, tmp_path):
    """2-process gloo FSDP2: a run resumed from its step-2 checkpoint in a new process group gives the
    same steps 3-4 (losses, gradient norms) and the same final weights as the uninterrupted run."""
    common = dict(TINY, train_file=data["train"], max_steps=4, per_device_batch_size=2, grad_accum_steps=2,
                  save_steps=2, save_total_limit=0, fsdp=True)
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=os.pathsep.join(sys.path))

    def launch(name, **kw):
        path = tmp_path / f"{name}.json"
        path.write_text(json.dumps(dict(common, output_dir=str(tmp_path / name), **kw)))
        proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node",
                               "2", "-m", "dft_kernels.train", "--config", str(path)],
                              env=env, capture_output=True, text=True, timeout=400)
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
        return proc, read_metrics(str(tmp_path / name / "metrics.jsonl"))

    _, full = launch("full")
    proc, resumed = launch("resumed", resume=str(tmp_path / "full" / "checkpoint-2"))
    assert f"resumed from {tmp_path / 'full' / 'checkpoint-2'} at step 2" in proc.stdout
    assert [r["step"] for r in resumed] == [3, 4]
    for key in ("loss", "grad_norm", "lr", "tokens_seen"):
        assert [r[key] for r in resumed] == [r[key] for r in full[2:]], key
    verify_checkpoint(str(tmp_path / "resumed" / "checkpoint-4"))
    assert_same_weights(weights(str(tmp_path / "resumed" / "checkpoint-4")),
                        weights(str(tmp_path / "full" / "checkpoint-4")))
