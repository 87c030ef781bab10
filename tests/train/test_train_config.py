"""dft-train's configuration: --help from the field metadata, and the loss checked at construction."""

import dataclasses
import re

import pytest

pytest.importorskip("transformers")

from dft_kernels.train import cli  # noqa: E402
from dft_kernels.train.config import ConfigError, TrainConfig, build_arg_parser, parse_args  # noqa: E402


def test_help_documents_every_field_with_its_default(capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "1000")  # no line wrapping inside the help texts
    with pytest.raises(SystemExit) as exc:
        parse_args(["--help"])
    assert exc.value.code == 0
    text = " ".join(capsys.readouterr().out.split())
    for f in dataclasses.fields(TrainConfig):
        help_text = f.metadata.get("help")
        assert help_text, f"{f.name} has no help text"
        default = f.default_factory() if f.default is dataclasses.MISSING else f.default
        pattern = re.escape(f"--{f.name}") + r"\b.*?" + re.escape(" ".join(help_text.split())) \
            + re.escape(f" (default: {default})")
        assert re.search(pattern, text), f"--{f.name}: help text or default missing"
    assert "--config" in text and "--demo" in text


def test_flags_types_and_booleans():
    cfg, extra = parse_args(["--lr", "3e-4", "--no-packing", "--packing", "--no-use_liger", "--max_steps", "7",
                             "--objective_args", '{"min_weight": 0.1}', "--resume", "latest"])
    assert (cfg.lr, cfg.packing, cfg.use_liger, cfg.max_steps, cfg.resume) == (3e-4, True, False, 7, "latest")
    assert cfg.objective_args == {"min_weight": 0.1} and extra == {"demo": False}
    with pytest.raises(SystemExit):
        build_arg_parser().parse_args(["--objective_args", "[1, 2]"])
    with pytest.raises(SystemExit):
        build_arg_parser().parse_args(["--max_steps", "many"])


@pytest.mark.parametrize("kwargs,field,words", [
    (dict(objective="dtf"), "objective", "unknown objective 'dtf'"),
    (dict(objective="dft", objective_args={"alpha": 2}), "objective_args", "do not fit objective"),
    (dict(objective="dft", objective_args={"min_weight": 2.0}), "objective_args", "min_weight"),
    (dict(loss_kwargs={"z_los": 1e-4}), "loss_kwargs", "unexpected keyword argument 'z_los'"),
    (dict(loss_kwargs={"z_loss": -1.0}), "loss_kwargs", "z_loss must be >= 0"),
    (dict(loss_kwargs={"label_smoothing": "0.1"}), "loss_kwargs", "label_smoothing must be a real number"),
    (dict(objective="focal", loss_kwargs={"label_smoothing": 0.1}), "loss_kwargs", "not defined for objective"),
    (dict(loss_kwargs={"backend": "trition"}), "loss_kwargs", "unknown backend 'trition'"),
    (dict(loss_kwargs={"reduction": "avg"}), "loss_kwargs", "reduction must be"),
    (dict(loss_kwargs={"ignore_index": -1}), "loss_kwargs", "must not set 'ignore_index'"),
])
def test_loss_options_fail_at_construction_naming_the_field(kwargs, field, words):
    with pytest.raises(ConfigError) as exc:
        TrainConfig(**kwargs)
    message = str(exc.value)
    assert message.startswith(f"{field}:") and words in message, message


def test_good_loss_options_pass():
    cfg = TrainConfig(objective="dft", objective_args={"min_weight": 0.1},
                      loss_kwargs={"z_loss": 1e-4, "label_smoothing": 0.1, "backend": "torch", "reduction": "mean"})
    assert cfg.make_objective().min_weight == 0.1


def test_cli_rejects_a_bad_objective_before_loading_anything(monkeypatch, tmp_path, capsys):
    """No data file exists and nothing is loaded: the objective fails first, with exit code 2."""
    import dft_kernels.train.loop as loop

    def must_not_train(*args, **kwargs):
        raise AssertionError("training started with a bad objective")
    monkeypatch.setattr(loop, "train", must_not_train)
    rc = cli.main(["--objective", "dtf", "--train_file", str(tmp_path / "missing.jsonl")])
    err = capsys.readouterr().err
    assert rc == 2 and re.search(r"dft-train: error: objective: unknown objective 'dtf'", err), err
