"""The demo (docs/demo.md): its data splits, rejection-sampling filter, token probabilities against
materialised logits, tie calls, and the whole pipeline at toy size (`make demo` runs the full size)."""

import json
import os

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("datasets")

from dft_kernels.train import TrainConfig  # noqa: E402
from dft_kernels.train.data import EvalExample, load_train_examples, single_rows  # noqa: E402
from dft_kernels.train.demo_data import SUITE, build_tokenizer, write_demo_suite  # noqa: E402
from dft_kernels.train.demo_report import verdict  # noqa: E402
from dft_kernels.train.metrics import read_metrics  # noqa: E402

TINY = dict(tiny_hidden_size=32, tiny_num_layers=1, tiny_num_heads=2, tiny_num_kv_heads=1, tiny_intermediate_size=64)


def _read(path):
    with open(path) as f:
        return [json.loads(line) for line in f]


def _terms(problem: str) -> int:
    return problem.count("+") + problem.count("-") + 1


@pytest.fixture(scope="module")
def suite(tmp_path_factory):
    return write_demo_suite(str(tmp_path_factory.mktemp("suite")))


def test_suite_splits_are_disjoint_and_sized(suite, tmp_path):
    rows = {name: _read(path) for name, path in suite.items()}
    problems = [r["problem"] for rs in rows.values() for r in rs]
    assert len(problems) == len(set(problems)), "a problem occurs in two splits"
    for name, (_, counts) in SUITE.items():
        got = {}
        for r in rows[name]:
            got[_terms(r["problem"])] = got.get(_terms(r["problem"]), 0) + 1
            assert r["solution"].endswith(f"\\boxed{{{r['answer']}}}.")
        want = {k: (126 if n == -1 else n) for k, n in counts.items()}
        assert got == want, (name, got, want)
    again = write_demo_suite(str(tmp_path))
    assert all(_read(again[k]) == rows[k] for k in rows), "generation is not deterministic"


def test_keep_verified_keeps_only_right_answers():
    from dft_kernels.train.demo_jobs import keep_verified

    exs = [EvalExample([{"role": "user", "content": "Compute 2+3."}], "5", "f:1"),
           EvalExample([{"role": "user", "content": "Compute 9-4+1."}], "6", "f:2")]
    outs = ["2+3=5\nThe answer is \\boxed{5}.", "2+3=6\nThe answer is \\boxed{6}.",
            "9-4=5\n5+1=6\nThe answer is \\boxed{5}.", "9-4=5\n5+1=6\nThe answer is \\boxed{6}."]
    kept = keep_verified(exs, outs, 2)
    assert [(k["problem"], k["solution"]) for k in kept] == [("Compute 2+3.", outs[0]), ("Compute 9-4+1.", outs[3])]
    with pytest.raises(ValueError, match="completions"):
        keep_verified(exs, outs[:3], 2)


def test_merge_samples_skips_setting_b_below_one_batch(tmp_path):
    from dft_kernels.train.demo import _merge_samples

    parts = [tmp_path / "a.jsonl", tmp_path / "b.jsonl"]
    parts[0].write_text('{"x": 1}\n{"x": 2}\n')
    parts[1].write_text('{"x": 3}\n')
    out = str(tmp_path / "all.jsonl")
    assert _merge_samples([str(p) for p in parts], out, 3)() is None
    assert [r["x"] for r in _read(out)] == [1, 2, 3]
    assert "fewer than one batch" in _merge_samples([str(p) for p in parts], out, 4)()


def test_target_kinds_marks_the_result_digits(tmp_path):
    from dft_kernels.train.demo_data import target_kinds

    path = tmp_path / "one.jsonl"
    path.write_text(json.dumps({"problem": "Compute 7+5+6.", "answer": "18",
                                "solution": "7+5=12\n12+6=18\nThe answer is \\boxed{18}."}) + "\n")
    tok = build_tokenizer()
    rows = single_rows(load_train_examples(str(path), tok, max_length=96))
    kinds = target_kinds(tok, rows)
    targets = [t for t in rows[0].labels[1:] if t != -100]
    assert len(kinds) == len(targets) == rows[0].num_targets
    assert "".join(tok.convert_ids_to_tokens([t for t, k in zip(targets, kinds) if k == "r"])) == "1218"


def _tiny_model(seed=0):
    from transformers import AutoModelForCausalLM

    from dft_kernels.train.model import _tiny_config

    tok = build_tokenizer()
    torch.manual_seed(seed)
    cfg = TrainConfig(model="tiny", max_length=96, **TINY)
    return AutoModelForCausalLM.from_config(_tiny_config(cfg, tok), attn_implementation="sdpa"), tok


def test_target_token_probs_match_materialised_softmax(suite):
    from dft_kernels.train.evaluate import target_token_probs

    model, tok = _tiny_model()
    with torch.no_grad():  # a fresh random head gives every target a probability near 1/V: spread it
        model.get_output_embeddings().weight.mul_(40.0)
    rows = single_rows(load_train_examples(suite["finetune"], tok, max_length=96))[:7]
    got = target_token_probs(model, rows, pad_token_id=tok.pad_token_id, batch_size=3)
    want = []
    for r in rows:  # one row at a time, no padding, full logits in float64
        with torch.no_grad():
            logits = model(input_ids=torch.tensor([r.input_ids])).logits[0].double()
        p = logits.softmax(-1)[:-1].gather(1, torch.tensor(r.labels[1:]).clamp_min(0)[:, None])[:, 0]
        want.append(p[torch.tensor(r.labels[1:]) != -100])
    want = torch.cat(want)
    assert got.shape == want.shape and got.dtype == torch.float32
    assert want.min() < 0.2 and want.max() > 0.5, "probabilities not spread: the test would be weak"
    assert torch.allclose(got.double(), want, rtol=1e-5, atol=1e-6)


def test_generate_answers_sampling_shapes_and_errors():
    import contextlib

    from dft_kernels.train.evaluate import generate_answers

    model, tok = _tiny_model()
    prompts = [[{"role": "user", "content": "Compute 1+2."}], [{"role": "user", "content": "Compute 3+4+5."}]]
    kw = dict(max_new_tokens=6, batch_size=2, device=torch.device("cpu"), autocast_ctx=contextlib.nullcontext)
    torch.manual_seed(0)
    outs = generate_answers(model.eval(), tok, prompts, temperature=1.0, num_samples=3, **kw)
    assert len(outs) == 6 and len(set(outs)) > 1
    assert generate_answers(model, tok, prompts, **kw) == generate_answers(model, tok, prompts, **kw)
    with pytest.raises(ValueError, match="temperature"):
        generate_answers(model, tok, prompts, temperature=0.0, num_samples=2, **kw)
    with pytest.raises(ValueError, match="temperature"):
        generate_answers(model, tok, prompts, temperature=-1.0, **kw)


def test_verdict_calls_ties_within_one_std():
    assert verdict([0.05]) == "one seed: no verdict"
    assert verdict([0.02, -0.01, 0.03]).startswith("tie")     # mean 0.013 < std 0.021
    assert verdict([0.05, 0.06, 0.07]) == "DFT better"
    assert verdict([-0.05, -0.06, -0.07], ("DFT", "SFT")) == "SFT better"


def test_demo_pipeline_small(tmp_path, capsys):
    """Every stage at toy size: warm start, its scores and samples, settings A and B (or B's skip
    when the random warm start solves too little), tables, figure and docs block."""
    from dft_kernels.train.demo import DemoOptions, run_demo

    opts = DemoOptions(warm_steps=2, steps=2, lr=1e-2, eval_every=1, n_heldout=4, rft_problems=16, num_samples=2,
                       probs_examples=6, eval_batch_size=16, max_new_tokens=12, jobs=2, out_dir=str(tmp_path),
                       overrides=dict(per_device_batch_size=2, **TINY))
    doc = tmp_path / "demo.md"
    doc.write_text("# Demo\n\nhand-written text\n")
    out = run_demo(opts, docs=str(doc), command="python -m dft_kernels.train.demo --test")
    text = capsys.readouterr().out
    assert "Setting A" in text and "Setting B" in text and "DFT - SFT, hard EM" in text
    seed = out["results"]["seeds"][0]
    for label, objective in (("SFT", "ce"), ("DFT", "dft"), ("ASFT", "dft")):
        run = seed["A"][label]
        assert run["objective"] == objective and run["steps"] == 2
        assert [p["step"] for p in run["curve"]] == [0, 1, 2]          # 0 = the warm start
        assert all(0 <= p["hard"] <= 1 and 0 <= p["easy"] <= 1 for p in run["curve"])
        assert len(run["probs"]) == len(seed["warm"]["probs"]) == len(run["kinds"]) > 0
        assert run["kinds"] == seed["warm"]["kinds"] and "r" in run["kinds"]
    # the same tokens scored before and after: fine-tuning changed their probabilities
    assert seed["A"]["SFT"]["probs"] != seed["warm"]["probs"]
    b = seed["B"]
    assert set(b) == {"RFT", "DFT", "ASFT"} or "fewer than one batch" in b["skipped"]
    # ASFT is DFT plus the anchor to the warm start (here, 2 steps from it with the first at lr 0, the
    # KL's gradient is still zero: the anchor's effect is checked in tests/train/test_train_anchor.py)
    assert len(read_metrics(os.path.join(tmp_path, "seed0", "A-ASFT", "metrics.jsonl"))) == 2
    with open(os.path.join(tmp_path, "seed0", "A-ASFT", "checkpoint-2", "trainer_state.json")) as f:
        state = json.load(f)
    assert state["config"]["kl_coef"] == 0.1 and state["config"]["kl"] == "forward"
    assert state["reference"]["source"] == "initial"
    assert "ASFT - DFT, hard EM" in text
    assert seed["sampling"]["samples"] == 32
    assert os.path.getsize(out["plot"]) > 20_000
    md = doc.read_text()
    assert md.startswith("# Demo\n\nhand-written text") and "--test" in md and "| SFT (ce) |" in md
    assert "| ASFT (dft + 0.1 KL) |" in md


def test_docs_block_is_replaced_not_appended(tmp_path):
    from dft_kernels.train.demo_report import END, write_docs_block

    doc = tmp_path / "d.md"
    doc.write_text("# Title\n\ntext before\n")
    write_docs_block(str(doc), "| first |", str(tmp_path / "x.png"), command="one", wall=1, cpu=2)
    first = doc.read_text()
    doc.write_text(first + "\ntext after\n")
    write_docs_block(str(doc), "| second |", str(tmp_path / "x.png"), command="two", wall=1, cpu=2)
    text = doc.read_text()
    assert text.count(END) == 1 and "| second |" in text and "| first |" not in text and "`two`" in text
    assert text.startswith("# Title\n\ntext before\n") and text.endswith("text after\n")
    assert "](x.png)" in text


def test_plan_runs_asft_beside_sft_and_dft_and_settings_select():
    from dft_kernels.train.demo import DemoOptions, plan, run_demo

    paths = {k: f"/data/{k}.jsonl" for k in ("warmstart", "finetune", "heldout_hard", "heldout_easy")}
    names = lambda opts: [j.name for j in plan(opts, paths, 0, shards=2)]  # noqa: E731
    both = names(DemoOptions())
    for n in ("A-SFT", "A-DFT", "A-ASFT", "B-RFT", "B-DFT", "B-ASFT", "sample0", "sample1"):
        assert f"seed0/{n}" in both, n
    only_a = names(DemoOptions(settings="A"))
    assert not any("sample" in n or "/B-" in n for n in only_a) and "seed0/A-ASFT" in only_a
    jobs = {j.name: j for j in plan(DemoOptions(asft_kl_coef=0.2), paths, 0, shards=1)}
    asft, dft = jobs["seed0/A-ASFT"].spec["config"], jobs["seed0/A-DFT"].spec["config"]
    assert (asft["objective"], asft["kl_coef"], asft["kl"], asft["ref_model"]) == ("dft", 0.2, "forward", None)
    assert dft["kl_coef"] == 0.0 and {k: v for k, v in asft.items() if k not in ("kl_coef", "output_dir")} == \
        {k: v for k, v in dft.items() if k not in ("kl_coef", "output_dir")}  # the same run but for the anchor
    with pytest.raises(ValueError, match="^settings: "):
        run_demo(settings="C")
    with pytest.raises(ValueError, match="^asft_kl_coef: "):
        run_demo(asft_kl_coef=0.0)
