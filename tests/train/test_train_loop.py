"""Trainer end to end on CPU with a tiny random Qwen2: packing isolation, gradient-accumulation
normalisation, bit-identical resume after SIGTERM, and 2-process gloo DDP == 1 process."""

import json
import os
import signal
import subprocess
import sys

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("datasets")

from dft_kernels.train import TrainConfig, train  # noqa: E402
from dft_kernels.train.checkpoint import list_checkpoints  # noqa: E402
from dft_kernels.train.metrics import read_metrics  # noqa: E402

TINY = dict(model="tiny", tiny_hidden_size=32, tiny_num_layers=2, tiny_num_heads=2, tiny_num_kv_heads=1,
            tiny_intermediate_size=64, max_length=96, lr=2e-3, seed=1, progress_bar=False, plot=False,
            save_final=False)


def cfg(data, out, **kw):
    return TrainConfig(**dict(TINY, train_file=data["train"], output_dir=str(out), **kw))


def rel(a, b):
    a, b = torch.tensor(a, dtype=torch.float64), torch.tensor(b, dtype=torch.float64)
    return float((a - b).norm() / b.norm())


def test_packed_rows_attend_only_within_each_example():
    from transformers import AutoModelForCausalLM

    from dft_kernels.train.data import Example, collate, pack_examples
    from dft_kernels.train.demo_data import build_tokenizer
    from dft_kernels.train.model import _tiny_config

    tok = build_tokenizer()
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(_tiny_config(TrainConfig(**TINY), tok), attn_implementation="sdpa").eval()
    lens = [7, 12, 5]
    exs = [Example(torch.randint(4, 99, (n,)).tolist(), [-100] * n, "x") for n in lens]
    (row,) = pack_examples(exs, 64, seed=0)
    batch = collate([row], tok.pad_token_id)
    with torch.no_grad():
        packed = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"]).logits[0]
        order = [e.input_ids for e in exs]
        start = 0
        for ids in (row.input_ids[s:s + n] for s, n in _segments(row.position_ids)):
            alone = model(input_ids=torch.tensor([ids])).logits[0]
            assert ids in order
            torch.testing.assert_close(packed[start:start + len(ids)], alone, rtol=1e-5, atol=1e-5)
            start += len(ids)
        # and without position ids restarting, the second example would see the first one
        leaky = model(input_ids=batch["input_ids"]).logits[0]
        assert not torch.allclose(leaky, packed, atol=1e-3)


def _segments(pos):
    starts = [i for i, p in enumerate(pos) if p == 0] + [len(pos)]
    return [(a, b - a) for a, b in zip(starts, starts[1:])]


def test_grad_accumulation_is_normalised_by_window_tokens(data, tmp_path, one_thread):
    a = train(cfg(data, tmp_path / "a", per_device_batch_size=4, grad_accum_steps=1, max_steps=4, objective="dft"))
    b = train(cfg(data, tmp_path / "b", per_device_batch_size=2, grad_accum_steps=2, max_steps=4, objective="dft"))
    assert rel(b["losses"], a["losses"]) <= 1e-5, (a["losses"], b["losses"])
    recs = read_metrics(a["metrics"])
    # Adam is nearly blind to a constant gradient scale; the gradient norm is not
    gn = lambda run: [r["grad_norm"] for r in read_metrics(run["metrics"])]  # noqa: E731
    assert rel(gn(b), gn(a)) <= 1e-5, (gn(a), gn(b))
    assert [r["step"] for r in recs] == [1, 2, 3, 4]
    for key in ("loss", "nll", "mean_prob", "accuracy", "entropy", "lr", "grad_norm", "tokens_per_s", "peak_mem_gb"):
        assert all(isinstance(r[key], float) for r in recs), key
    assert all(0 < r["mean_prob"] < 1 and 0 <= r["accuracy"] <= 1 for r in recs)
    # DFT loss = mean of p * nll < nll; the stats see the same tokens as the loss
    assert all(r["loss"] < r["nll"] for r in recs)


def test_resume_after_sigterm_is_bit_identical(data, tmp_path, one_thread):
    steps = 8
    ref = train(cfg(data, tmp_path / "ref", per_device_batch_size=4, grad_accum_steps=2, max_steps=steps,
                    objective="dft"))

    def kill_at_3(rec):
        if rec["step"] == 3:
            os.kill(os.getpid(), signal.SIGTERM)  # a real signal through the trainer's handler

    out = tmp_path / "run"
    first = train(cfg(data, out, per_device_batch_size=4, grad_accum_steps=2, max_steps=steps, objective="dft"),
                  on_step=kill_at_3)
    assert first["interrupted"] == "SIGTERM"
    assert first["steps"] < steps and first["checkpoint"].endswith(f"checkpoint-{first['steps']}")
    assert [os.path.basename(p) for p in list_checkpoints(str(out))] == [f"checkpoint-{first['steps']}"]
    assert not [n for n in os.listdir(out) if n.startswith(".tmp")]  # written atomically
    ck = os.path.join(first["checkpoint"], "model")
    assert os.path.isfile(os.path.join(ck, "model.safetensors")) and os.path.isfile(os.path.join(ck, "tokenizer.json"))
    from dft_kernels.train.demo_data import build_tokenizer
    from dft_kernels.train.model import load_tokenizer
    text = "<|im_start|>user\nCompute 7-1+9.<|im_end|>\n"
    saved = load_tokenizer(TrainConfig(tokenizer=ck))  # the checkpoint's tokenizer gives the same ids
    assert saved(text)["input_ids"] == build_tokenizer()(text)["input_ids"]

    resumed = train(cfg(data, out, per_device_batch_size=4, grad_accum_steps=2, max_steps=steps, objective="dft",
                        resume="latest"))
    assert resumed["interrupted"] is None and resumed["steps"] == steps
    curve = [r["loss"] for r in read_metrics(resumed["metrics"]) if "loss" in r]
    assert curve == ref["losses"]  # bit-identical, not approximately
    assert len(resumed["losses"]) == steps - first["steps"]


DIST_COMMON = dict(max_steps=3, grad_accum_steps=2, objective="dft", eval_limit=4, eval_max_new_tokens=12,
                   eval_batch_size=2)


@pytest.fixture(scope="module")
def single_process_run(data, tmp_path_factory):
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return train(cfg(data, tmp_path_factory.mktemp("one"), per_device_batch_size=4, eval_file=data["heldout"],
                         **DIST_COMMON))
    finally:
        torch.set_num_threads(n)


@pytest.mark.parametrize("fsdp", [False, True], ids=["ddp", "fsdp2"])
def test_two_process_gloo_matches_one_process(data, tmp_path, single_process_run, fsdp):
    two_cfg = cfg(data, tmp_path / "two", per_device_batch_size=2, eval_file=data["heldout"], fsdp=fsdp,
                  save_final=fsdp, **DIST_COMMON)
    path = tmp_path / "two.json"
    path.write_text(json.dumps(two_cfg.to_dict()))
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=os.pathsep.join(sys.path))
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           "-m", "dft_kernels.train", "--config", str(path)],
                          env=env, capture_output=True, text=True, timeout=400)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    recs = read_metrics(str(tmp_path / "two" / "metrics.jsonl"))
    losses = [r["loss"] for r in recs if "loss" in r]
    single = single_process_run
    assert len(losses) == 3
    assert rel(losses, single["losses"]) <= 1e-5, (losses, single["losses"])
    norms = [r["grad_norm"] for r in recs if "grad_norm" in r]
    ref_norms = [r["grad_norm"] for r in read_metrics(single["metrics"]) if "grad_norm" in r]
    assert rel(norms, ref_norms) <= 1e-5, (norms, ref_norms)  # catches a missing world-size factor
    ev = [r for r in recs if "eval/n" in r]
    assert ev and ev[-1]["eval/n"] == 4 and ev[-1]["eval/exact_match"] == single["eval_exact_match"]
    if fsdp:  # the gathered full checkpoint loads as a plain HF model
        from transformers import AutoModelForCausalLM
        m = AutoModelForCausalLM.from_pretrained(str(tmp_path / "two" / "checkpoint-3" / "model"))
        assert m.get_output_embeddings().weight.shape[1] == 32


def test_packed_training_counts_the_same_targets(data, tmp_path, one_thread):
    packed = train(cfg(data, tmp_path / "p", packing=True, max_length=192, per_device_batch_size=2, max_steps=2))
    recs = read_metrics(packed["metrics"])
    assert len(recs) == 2 and all(0 < r["loss"] < 10 and r["num_target_tokens"] > 0 for r in recs)
    # a packed row holds several examples: more targets per row than unpacked rows
    plain = read_metrics(train(cfg(data, tmp_path / "u", per_device_batch_size=2, max_steps=2))["metrics"])
    assert recs[0]["num_target_tokens"] > plain[0]["num_target_tokens"]
