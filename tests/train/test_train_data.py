"""Trainer data pipeline: formats, prompt masking, truncation, packing, batch plan, bad-data errors
(each must name file:line), config precedence and answer extraction.  No model, fast."""

import json

import pytest

pytest.importorskip("transformers")
pytest.importorskip("datasets")

from dft_kernels.train import TrainConfig  # noqa: E402
from dft_kernels.train.config import ConfigError, parse_args  # noqa: E402
from dft_kernels.train.data import (  # noqa: E402
    IGNORE_INDEX,
    BatchPlan,
    DataError,
    collate,
    load_eval_examples,
    load_train_examples,
    pack_examples,
    single_rows,
)
from dft_kernels.train.demo_data import build_tokenizer, make_split  # noqa: E402
from dft_kernels.train.evaluate import extract_answer, is_match  # noqa: E402


@pytest.fixture(scope="module")
def tok():
    return build_tokenizer()


def write_lines(path, lines):
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")
    return str(path)


def learned_text(tok, ex):
    return tok.decode([t for t in ex.labels if t != IGNORE_INDEX], skip_special_tokens=False)


# ------------------------------------------------------------------------------- formats, masking

def test_problem_solution_masks_prompt(tmp_path, tok):
    rows = make_split(3, 5, [2, 3])
    path = write_lines(tmp_path / "d.jsonl", [json.dumps(r) for r in rows])
    exs = load_train_examples(path, tok, max_length=512)
    assert [e.where for e in exs] == [f"{path}:{i}" for i in range(1, 6)]
    for r, e in zip(rows, exs):
        assert learned_text(tok, e) == r["solution"] + "<|im_end|>\n"
        full = tok.decode(e.input_ids, skip_special_tokens=False)
        n_prompt = next(i for i, t in enumerate(e.labels) if t != IGNORE_INDEX)
        assert tok.decode(e.input_ids[:n_prompt], skip_special_tokens=False).endswith("<|im_start|>assistant\n")
        assert r["problem"] in full


def test_prompt_completion_and_multiturn_messages(tmp_path, tok):
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "1+1?"},
            {"role": "assistant", "content": "2"}, {"role": "user", "content": "and 2+2?"},
            {"role": "assistant", "content": "4"}]
    path = write_lines(tmp_path / "d.jsonl", [json.dumps({"prompt": "Say hi", "completion": "hi"}),
                                              json.dumps({"prompt": "Say yo", "completion": "yo"})])
    ex = load_train_examples(path, tok, max_length=512)
    assert learned_text(tok, ex[0]) == "hi<|im_end|>\n"
    path2 = write_lines(tmp_path / "m.jsonl", [json.dumps({"messages": msgs})])
    (ex2,) = load_train_examples(path2, tok, max_length=512)
    # both assistant turns are learned, no user/system text is
    assert learned_text(tok, ex2) == "2<|im_end|>\n4<|im_end|>\n"


def test_json_array_and_parquet(tmp_path, tok):
    rows = make_split(4, 3, [2])
    jpath = tmp_path / "d.json"
    jpath.write_text("[\n" + ",\n".join(json.dumps(r) for r in rows) + "\n]\n")
    assert [e.where for e in load_train_examples(str(jpath), tok, max_length=256)] == \
        [f"{jpath}:{i}" for i in (2, 3, 4)]
    import datasets
    ppath = str(tmp_path / "d.parquet")
    datasets.Dataset.from_list(rows).to_parquet(ppath)
    exs = load_train_examples(ppath, tok, max_length=256)
    assert [learned_text(tok, e) for e in exs] == [r["solution"] + "<|im_end|>\n" for r in rows]


def test_truncation_keeps_learnable_prefix(tmp_path, tok):
    r = make_split(5, 1, [4])[0]
    path = write_lines(tmp_path / "d.jsonl", [json.dumps(r)])
    (full,) = load_train_examples(path, tok, max_length=512)
    n_prompt = next(i for i, t in enumerate(full.labels) if t != IGNORE_INDEX)
    (cut,) = load_train_examples(path, tok, max_length=n_prompt + 3)
    assert len(cut.input_ids) == n_prompt + 3
    assert cut.input_ids == full.input_ids[:n_prompt + 3] and cut.labels == full.labels[:n_prompt + 3]


# --------------------------------------------------------------------------------- bad data

BAD_CASES = {
    "malformed_jsonl": ("d.jsonl", ['{"prompt": "a", "completion": "b"}', '{"prompt": "a", "completion": "b"}',
                                    '{"prompt": "a", completion: "b"}'], 3, "malformed JSON"),
    "malformed_json_array": ("d.json", ['[', '{"prompt": "a", "completion": "b"},', '{"prompt": "a" "completion": 1}',
                                        ']'], 3, "malformed JSON"),
    "missing_field": ("d.jsonl", ['{"problem": "1+1", "solution": "2"}', '', '{"problem": "2+2"}'], 3,
                      "missing field 'solution'"),
    "wrong_type": ("d.jsonl", ['{"prompt": "a", "completion": "b"}', '{"prompt": "a", "completion": 5}'], 2,
                   "must be a string"),
    "not_an_object": ("d.jsonl", ['{"prompt": "a", "completion": "b"}', '[1, 2]'], 2, "JSON object"),
    "no_assistant": ("d.jsonl", ['{"messages": [{"role": "user", "content": "hi"}]}'], 1, "no assistant turn"),
    "bad_role": ("d.jsonl", ['{"messages": [{"role": "robot", "content": "hi"}, '
                             '{"role": "assistant", "content": "x"}]}'], 1, "unknown role"),
    "unknown_format": ("d.jsonl", ['{"question": "a", "answer": "b"}'], 1, "cannot tell the data format"),
    "empty_jsonl": ("d.jsonl", [""], 1, "empty data set"),
    "empty_array": ("d.json", ["[]"], 1, "empty data set"),
    "too_long": ("d.jsonl", ['{"prompt": "short", "completion": "b"}',
                             json.dumps({"prompt": "x" * 300, "completion": "answer"})], 2, "nothing is left to learn"),
}


@pytest.mark.parametrize("case", sorted(BAD_CASES))
def test_bad_data_names_file_and_line(tmp_path, tok, case):
    name, lines, line, msg = BAD_CASES[case]
    path = tmp_path / name
    path.write_text("\n".join(lines) + ("\n" if lines != [""] else ""))
    with pytest.raises(DataError) as e:
        load_train_examples(str(path), tok, max_length=64)
    assert str(e.value).startswith(f"{path}:{line}:"), str(e.value)
    assert msg in str(e.value)


def test_bad_parquet_names_row(tmp_path, tok):
    import datasets
    path = str(tmp_path / "d.parquet")
    datasets.Dataset.from_list([{"problem": "1+1", "solution": "2"}, {"problem": "2+2", "solution": None}]
                               ).to_parquet(path)
    with pytest.raises(DataError, match=rf"^{path}:row 1: missing field 'solution'"):
        load_train_examples(path, tok, max_length=64)


def test_missing_file_and_bad_extension(tmp_path, tok):
    with pytest.raises(DataError, match="file not found"):
        load_train_examples(str(tmp_path / "nope.jsonl"), tok, max_length=64)
    (tmp_path / "d.txt").write_text("x")
    with pytest.raises(DataError, match="unsupported file type"):
        load_train_examples(str(tmp_path / "d.txt"), tok, max_length=64)


def test_eval_examples_need_an_answer(tmp_path):
    path = write_lines(tmp_path / "e.jsonl", [json.dumps({"prompt": "q", "completion": "\\boxed{12}"}),
                                              json.dumps({"prompt": "q", "completion": "no idea"})])
    with pytest.raises(DataError, match=rf"^{path}:2: no reference answer"):
        load_eval_examples(path)
    (ok,) = load_eval_examples(path, limit=1)
    assert ok.answer == "12" and ok.prompt == [{"role": "user", "content": "q"}]


# ------------------------------------------------------------------------------ packing, batches

def test_packing_restarts_positions_and_never_targets_across_examples(tmp_path, tok):
    rows = make_split(6, 40, [2, 3, 4])
    path = write_lines(tmp_path / "d.jsonl", [json.dumps(r) for r in rows])
    exs = load_train_examples(path, tok, max_length=200)
    packed = pack_examples(exs, 200, seed=1)
    assert len(packed) < len(exs)
    assert sum(len(r.input_ids) for r in packed) == sum(len(e.input_ids) for e in exs)
    assert sum(r.num_targets for r in packed) == sum(r.num_targets for r in single_rows(exs))
    for r in packed:
        assert len(r.input_ids) <= 200
        starts = [i for i, p in enumerate(r.position_ids) if p == 0]
        assert len(starts) >= 1 and starts[0] == 0
        for s in starts:  # the first token of each example is never a target
            assert r.labels[s] == IGNORE_INDEX
    batch = collate(packed[:3], tok.pad_token_id)
    w = batch["input_ids"].shape[1]
    for i, r in enumerate(packed[:3]):
        pad = w - len(r.input_ids)
        assert batch["labels"][i, len(r.input_ids):].eq(IGNORE_INDEX).all()
        assert batch["position_ids"][i, len(r.input_ids):].tolist() == list(range(pad))


def test_batch_plan_ranks_partition_the_single_process_batches():
    single = BatchPlan(50, per_device_batch=4, accum=2, world=1, seed=3)
    two = BatchPlan(50, per_device_batch=2, accum=2, world=2, seed=3)
    assert single.steps_per_epoch == two.steps_per_epoch == 6
    for step in (0, 5, 6, 13):  # across an epoch boundary too
        s = single.micro_batches(step, 0)
        r0, r1 = two.micro_batches(step, 0), two.micro_batches(step, 1)
        for m in range(2):
            assert s[m] == r0[m] + r1[m]
    epoch0 = sorted(i for st in range(6) for mb in single.micro_batches(st, 0) for i in mb)
    assert len(set(epoch0)) == 48
    with pytest.raises(DataError, match="fewer than one global batch"):
        BatchPlan(3, per_device_batch=4, accum=1, world=1, seed=0)


# ------------------------------------------------------------------------------ config, answers

def test_config_precedence_file_then_flags(tmp_path):
    import yaml
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump({"lr": 1e-4, "objective": "dft", "objective_args": {"min_weight": 0.1},
                                    "packing": True}))
    cfg, extra = parse_args(["--config", str(path), "--lr", "3e-4", "--no-packing", "--max_steps", "7"])
    assert (cfg.lr, cfg.packing, cfg.max_steps, cfg.objective_args) == (3e-4, False, 7, {"min_weight": 0.1})
    assert cfg.make_objective().min_weight == 0.1 and not extra["demo"]
    assert TrainConfig().lr == 5e-5 and TrainConfig().adam_beta2 == 0.95 and TrainConfig().warmup_ratio == 0.1
    (tmp_path / "bad.yaml").write_text("lr: [1,\n  2\nobjective: : x\n")
    with pytest.raises(ConfigError, match=r"bad.yaml:\d+: invalid YAML"):
        parse_args(["--config", str(tmp_path / "bad.yaml")])
    (tmp_path / "u.json").write_text(json.dumps({"learning_rate": 1}))
    with pytest.raises(ConfigError, match="unknown option"):
        parse_args(["--config", str(tmp_path / "u.json")])
    with pytest.raises(ConfigError, match="warmup_ratio"):
        TrainConfig(warmup_ratio=1.5)
    with pytest.raises(ConfigError, match="objective_args"):
        TrainConfig(objective="dft", objective_args={"alpha": 2}).make_objective()


@pytest.mark.parametrize("text,answer", [
    ("so \\boxed{42}.", "42"), ("\\boxed{\\frac{1}{2}} then", "\\frac{1}{2}"), ("x=3, y = -17.", "-17"),
    ("total 1,234 apples", "1,234"), ("nothing", None), ("\\boxed{1} and later \\boxed{7}", "7"),
])
def test_extract_answer(text, answer):
    assert extract_answer(text) == answer


def test_exact_match_normalises_numbers():
    assert is_match("1,234", "1234") and is_match("5.0", "5") and is_match(" 7 ", "7")
    assert not is_match("8", "7") and not is_match(None, "7")
