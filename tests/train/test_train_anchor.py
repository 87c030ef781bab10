"""dft-train's anchor (ASFT: ``--kl-coef``, ``--kl``, ``--ref-model``): the options, the step-1 loss against the
float64 reference on both models' hidden states, the frozen reference, kl_coef=0 = the plain path, and resume."""

import json
import os
import signal

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("datasets")

import dft_kernels as dk  # noqa: E402
from dft_kernels.train import TrainConfig, train  # noqa: E402
from dft_kernels.train import model as train_model  # noqa: E402
from dft_kernels.train.config import ConfigError, parse_args  # noqa: E402
from helpers import rel_err  # noqa: E402

TINY = dict(model="tiny", tiny_hidden_size=32, tiny_num_layers=2, tiny_num_heads=2, tiny_num_kv_heads=1,
            tiny_intermediate_size=64, max_length=96, lr=2e-3, seed=1, progress_bar=False, plot=False,
            save_final=False, per_device_batch_size=4)


def cfg(data, out, **kw):
    return TrainConfig(**dict(TINY, train_file=data["train"], output_dir=str(out), **kw))


# --------------------------------------------------------------------------------------- options

def test_cli_parses_the_anchor_options():
    c, _ = parse_args(["--kl-coef", "0.1", "--kl", "reverse", "--ref-model", "/some/dir"])
    assert (c.kl_coef, c.kl, c.ref_model) == (0.1, "reverse", "/some/dir")
    c, _ = parse_args(["--kl_coef", "0.25"])
    assert (c.kl_coef, c.kl, c.ref_model) == (0.25, "forward", None)
    assert c.anchor_kwargs() == {"kl_coef": 0.25, "kl": "forward"}
    c, _ = parse_args([])
    assert c.kl_coef == 0.0 and c.anchor_kwargs() == {}


def test_help_shows_the_anchor_options(capsys):
    from dft_kernels.train.cli import main

    with pytest.raises(SystemExit) as e:
        main(["--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    for flag in ("--kl-coef", "--kl ", "--ref-model"):
        assert flag in out, flag


@pytest.mark.parametrize("values, name", [
    (dict(kl_coef=-0.1), "kl_coef"),
    (dict(kl_coef=float("nan")), "kl_coef"),
    (dict(kl_coef=0.1, kl="backward"), "kl"),
    (dict(ref_model="/some/dir"), "ref_model"),                       # a reference without the anchor
    (dict(kl_coef=0.1, loss_kwargs={"kl_coef": 0.1}), "loss_kwargs"),  # the trainer owns it
])
def test_bad_anchor_options_name_the_option(values, name):
    with pytest.raises(ConfigError, match=f"^{name}: "):
        TrainConfig(**values)


def test_cli_reports_a_negative_kl_coef(capsys):
    from dft_kernels.train.cli import main

    assert main(["--kl-coef", "-1", "--train_file", "x.jsonl"]) == 2
    assert "kl_coef: must be a finite number >= 0, got -1.0" in capsys.readouterr().err


def test_missing_ref_model_dir_is_named(data, tmp_path):
    with pytest.raises(ConfigError, match="^ref_model: .*not a local model directory"):
        train(cfg(data, tmp_path / "run", max_steps=1, kl_coef=0.1, ref_model=str(tmp_path / "nowhere")))


def _tiny_model_dir(path, seed, **kw):
    """A tiny Qwen2 saved as a model directory (another init than the run's: the anchor's KL is not zero)."""
    from dft_kernels.train.demo_data import build_tokenizer
    from dft_kernels.train.model import _tiny_config

    tok = build_tokenizer()
    torch.manual_seed(seed)
    from transformers import AutoModelForCausalLM

    m = AutoModelForCausalLM.from_config(_tiny_config(TrainConfig(**dict(TINY, **kw)), tok))
    m.save_pretrained(str(path))
    tok.save_pretrained(str(path))
    return str(path)


def test_mismatched_vocab_is_named(data, tmp_path):
    ref = _tiny_model_dir(tmp_path / "ref", seed=5)
    cfg_file = os.path.join(ref, "config.json")
    with open(cfg_file) as f:
        c = json.load(f)
    from transformers import AutoModelForCausalLM, Qwen2Config

    c["vocab_size"] += 7
    AutoModelForCausalLM.from_config(Qwen2Config(**{k: v for k, v in c.items() if k != "architectures"})) \
        .save_pretrained(ref)
    with pytest.raises(ConfigError, match="^ref_model: the reference's LM head has .* rows"):
        train(cfg(data, tmp_path / "run", max_steps=1, kl_coef=0.1, ref_model=ref))


# ------------------------------------------------------------------------------------- training

class Capture:
    """Wraps build_reference: keeps the reference, the parameters of the model and the reference before
    step 1, and every training call's batch (a pre-hook on the patched model)."""

    def __init__(self, monkeypatch):
        self.reference = None
        self.calls = []
        self.start = None
        real = train_model.build_reference

        def build(cfg_, tokenizer, device, attn, model, initial=None):
            ref = real(cfg_, tokenizer, device, attn, model, initial)
            self.reference = ref
            self.model = model
            self.start = {k: v.detach().clone() for k, v in model.state_dict().items()}
            self.ref_start = None if ref is None else {k: v.detach().clone()
                                                       for k, v in ref.model.state_dict().items()}
            model.register_forward_pre_hook(self._record, with_kwargs=True)
            return ref

        monkeypatch.setattr(train_model, "build_reference", build)

    def _record(self, module, args, kwargs):
        if module.training and torch.is_grad_enabled():
            self.calls.append({k: v for k, v in kwargs.items() if k in
                               ("input_ids", "position_ids", "labels", "num_items_in_batch", "ref_hidden_states")})


def _float64_hidden(model, params, batch):
    """The final hidden states and head weight of ``model``'s class and config with ``params``, in float64."""
    m = type(model)(model.config).double().eval()
    m.load_state_dict({k: v.double() for k, v in params.items()})
    with torch.no_grad():
        h = m.get_decoder()(input_ids=batch["input_ids"], position_ids=batch["position_ids"]).last_hidden_state
    return h, m.get_output_embeddings().weight.detach()


@pytest.mark.parametrize("kl", ["forward", "reverse"])
def test_step1_loss_is_the_float64_reference_on_both_models_hidden_states(data, tmp_path, one_thread, monkeypatch,
                                                                          kl):
    ref_dir = _tiny_model_dir(tmp_path / "ref", seed=7)  # another init: the KL term is far from zero at step 1
    cap = Capture(monkeypatch)
    run = train(cfg(data, tmp_path / "run", max_steps=2, objective="dft", kl_coef=0.3, kl=kl, ref_model=ref_dir))
    assert cap.reference.source == ref_dir
    batch = cap.calls[0]
    assert batch["ref_hidden_states"] is not None
    h, w = _float64_hidden(cap.model, cap.start, batch)
    ref_params = {k: v for k, v in cap.ref_start.items()}
    rh, rw = _float64_hidden(cap.reference.model, ref_params, batch)
    kw = dict(objective="dft", shift=True, num_items_in_batch=batch["num_items_in_batch"].double())
    want = dk.reference.linear_cross_entropy(h, w, batch["labels"], ref_input=rh, ref_weight=rw, kl_coef=0.3, kl=kl,
                                             **kw)
    plain = dk.reference.linear_cross_entropy(h, w, batch["labels"], **kw)
    got = torch.tensor(run["losses"][0], dtype=torch.float64)
    assert rel_err(got, want) <= 1e-5, (float(got), float(want))
    assert float(want - plain) > 1e-3 * float(plain)  # the anchor's term is in the loss, not negligible


def test_initial_copy_stays_frozen_and_the_anchor_moves_the_run(data, tmp_path, one_thread, monkeypatch):
    cap = Capture(monkeypatch)
    run = train(cfg(data, tmp_path / "a", max_steps=4, objective="dft", kl_coef=0.5))
    ref = cap.reference
    assert ref.source == "initial" and not ref.model.training
    assert len(cap.calls) == 4 and all(not c["ref_hidden_states"].requires_grad for c in cap.calls)
    # the reference is the model before step 1: same values, separate storage
    assert all(torch.equal(cap.start[k], v) for k, v in cap.ref_start.items())
    for name, p in ref.model.named_parameters():
        assert not p.requires_grad and p.grad is None, name
        assert torch.equal(p, cap.ref_start[name]), f"{name} changed"
    trained = dict(cap.model.named_parameters())
    assert not torch.equal(trained["lm_head.weight"], ref.model.lm_head.weight)  # the model moved, not the copy
    assert all(p.data_ptr() != trained[n].data_ptr() for n, p in ref.model.named_parameters())
    # step 1: the reference is the model, so the KL is 0 and the loss is the plain DFT loss of the same run
    plain = train(cfg(data, tmp_path / "b", max_steps=4, objective="dft"))
    assert run["losses"][0] == pytest.approx(plain["losses"][0], rel=1e-6)
    assert run["losses"][1:] != plain["losses"][1:]


def test_kl_coef_zero_is_exactly_the_plain_path(data, tmp_path, one_thread, monkeypatch):
    cap = Capture(monkeypatch)
    zero = train(cfg(data, tmp_path / "zero", max_steps=3, objective="dft", kl_coef=0.0))
    assert cap.reference is None and all("ref_hidden_states" not in c for c in cap.calls)
    assert cap.model.dft_kernels_loss_kwargs == {}
    plain = train(TrainConfig(**dict(TINY, train_file=data["train"], output_dir=str(tmp_path / "plain"), max_steps=3,
                                     objective="dft")))
    assert zero["losses"] == plain["losses"]  # bit for bit


def test_resume_rebuilds_the_initial_reference_and_checks_it(data, tmp_path, one_thread):
    full = train(cfg(data, tmp_path / "full", max_steps=4, objective="dft", kl_coef=0.5))
    out = tmp_path / "run"
    first = train(cfg(data, out, max_steps=4, objective="dft", kl_coef=0.5, save_steps=2),
                  on_step=lambda rec: rec["step"] == 2 and os.kill(os.getpid(), signal.SIGTERM))
    k = first["steps"]
    assert first["interrupted"] == "SIGTERM" and 2 <= k < 4 and first["checkpoint"].endswith(f"checkpoint-{k}")
    with open(os.path.join(first["checkpoint"], "trainer_state.json")) as f:
        saved = json.load(f)["reference"]
    assert saved["source"] == "initial" and len(saved["sha256"]) == 64
    # the resumed run holds the checkpoint's model and rebuilds the initial one as its reference
    resumed = train(cfg(data, out, max_steps=4, objective="dft", kl_coef=0.5, save_steps=2, resume="latest"))
    assert resumed["losses"] == full["losses"][k:]  # the same anchor after the resume: bit-identical


def test_resume_refuses_a_reference_that_changed(data, tmp_path, one_thread):
    from dft_kernels.train.checkpoint import CheckpointError

    ref = _tiny_model_dir(tmp_path / "ref", seed=7)
    out = tmp_path / "run"
    run = dict(max_steps=3, objective="dft", kl_coef=0.5, ref_model=ref, save_steps=2, save_final=False)
    train(cfg(data, out, **run))  # leaves checkpoint-2
    _tiny_model_dir(tmp_path / "ref", seed=8)  # the same path, other weights: the config alone cannot tell
    with pytest.raises(CheckpointError, match="^resume: the reference model differs: .*--force_resume"):
        train(cfg(data, out, resume="latest", **run))


@pytest.mark.parametrize("fsdp", [False, True], ids=["ddp", "fsdp2"])
def test_two_process_gloo_anchor_matches_one_process(data, tmp_path, fsdp):
    import subprocess
    import sys

    from dft_kernels.train.metrics import read_metrics

    common = dict(max_steps=3, grad_accum_steps=2, objective="dft", kl_coef=0.5)
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        single = train(cfg(data, tmp_path / "one", **dict(common, per_device_batch_size=4)))
    finally:
        torch.set_num_threads(n)
    two_cfg = cfg(data, tmp_path / "two", fsdp=fsdp, **dict(common, per_device_batch_size=2))
    path = tmp_path / "two.json"
    path.write_text(json.dumps(two_cfg.to_dict()))
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=os.pathsep.join(sys.path))
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           "-m", "dft_kernels.train", "--config", str(path)],
                          env=env, capture_output=True, text=True, timeout=400)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    losses = [r["loss"] for r in read_metrics(str(tmp_path / "two" / "metrics.jsonl")) if "loss" in r]
    assert len(losses) == 3
    # steps 2 and 3 carry a non-zero KL (the model has moved from the initial copy)
    assert rel_err(torch.tensor(losses, dtype=torch.float64), torch.tensor(single["losses"], dtype=torch.float64)) \
        <= 1e-5, (losses, single["losses"])
