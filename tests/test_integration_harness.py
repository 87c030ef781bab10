"""The trainer smoke tests' verdict (integration/common.py ``check``) and the runner's table
(integration/run.py): each check fails when its condition is broken.  The smoke tests themselves
run in each trainer's pinned environment (`make integration`); this file runs without them."""

from __future__ import annotations

import copy

import pytest

from integration import common, run


def _run(loss1: float, **overrides) -> dict:
    """What one training run reports when everything is right (STEPS logged losses, GA micro-batches
    in step 1, the chunk logits seen, the largest tensor the lm_head weight)."""
    first = [{"input_ids": [[5, 6, 7, 8]] * common.BS, "labels": [[-100, 6, 7, 8]] * common.BS,
              "num_items_in_batch": 12}] * common.GA
    r = {"logged_losses": [loss1, 0.5, 0.4], "global_step": common.STEPS, "first_step": first,
         "params_sha256": "ab" * 32, "largest": [common.V * common.H] * (common.STEPS * common.GA),
         "largest_op": ["aten.mm"] * (common.STEPS * common.GA), "tokens": [80] * (common.STEPS * common.GA),
         "supervised": [40] * (common.STEPS * common.GA), "chunk_logits_seen": [True] * (common.STEPS * common.GA)}
    r.update(overrides)
    return r


def _ours(**overrides) -> dict:
    r = _run(0.25, reference_step1=0.25 * (1 + 2e-6), fused_calls=common.STEPS * common.GA,
             checked_micro_batches=common.STEPS * common.GA)
    r.update(overrides)
    return r


def test_check_passes_a_matching_pair():
    assert common.check(_ours(), _run(0.25 * (1 - 3e-6))) == []


@pytest.mark.parametrize("ours, theirs, reason", [
    (_ours(), _run(0.25 * (1 + 2e-5)), "step-1 loss ours"),                           # (a) vs theirs
    (_ours(reference_step1=0.25 * (1 - 2e-5)), _run(0.25), "float64 reference"),      # (a) vs float64
    (_ours(largest=[common.V * common.H] * 5 + [40 * common.V]), _run(0.25), "supervised tokens x vocab"),  # (b)
    (_ours(chunk_logits_seen=[True] * 5 + [False]), _run(0.25), "did not see the chunk logits"),           # (b)
    (_ours(fused_calls=common.STEPS * common.GA - 1), _run(0.25), "fused loss ran"),                      # (c)
    (_ours(checked_micro_batches=0), _run(0.25), "FusedLossCheck checked"),                                # (c)
    (_ours(params_sha256="cd" * 32), _run(0.25), "parameters before step 1 differ"),
    (_ours(), _run(0.25, global_step=2), "2 steps"),
    (_ours(), _run(0.25, logged_losses=[0.25, 0.5, 0.41]), "steps 2..3"),
    (_ours(error="RuntimeError: boom"), _run(0.25), "ours run failed"),
])
def test_check_fails_each_broken_condition(ours, theirs, reason):
    reasons = common.check(copy.deepcopy(ours), copy.deepcopy(theirs))
    assert any(reason in r for r in reasons), reasons


def test_check_flags_a_logits_tensor_without_the_last_position():
    # [batch, positions - 1, vocab] (shifted logits) is below positions x vocab but above supervised x vocab
    ours = _ours(largest=[common.V * common.H] * 5 + [(80 - common.BS) * common.V])
    assert any("supervised tokens x vocab" in r for r in common.check(ours, _run(0.25)))


def test_table_lists_losses_relative_error_and_not_installable():
    rows = [{"trainer": "trl", "version": "1.16.0", "status": "pass", "install_s": 0.0, "wall_s": 12.3,
             "ours_step1": 0.25, "theirs_step1": 0.25 * (1 + 1e-7)},
            {"trainer": "axolotl", "version": "0.19.0", "status": "not installable", "install_s": 40.0}]
    lines = run.table(rows).splitlines()
    assert lines[2].split(" | ")[1:7] == ["1.16.0", "pass", "0.250000000", "0.250000025", "1.0e-07", "12 s"]
    assert "not installable" in lines[3] and "40 s" in lines[3]


def test_pip_error_quotes_the_error_lines():
    log = "Collecting foo\n  Downloading foo.whl\nERROR: Could not find a version that satisfies foo==9\nmore\n"
    assert run._pip_error(log).startswith("ERROR: Could not find a version that satisfies foo==9")


def test_trl_smoke_test_in_the_test_environment(tmp_path):
    """The TRL smoke test (integration/smoke_trl.py: DFTSFTTrainer vs SFTTrainer(loss_type="dft"),
    3 steps x 2 micro-batches, and the bypass refusal) with the test environment's TRL, as
    `make integration --only trl` runs it in its pinned environment (~40 s on an idle CPU)."""
    import json
    import subprocess
    import sys

    pytest.importorskip("trl")
    env = run.smoke_env()
    env.pop("TRITON_INTERPRET", None)  # as `make integration` runs it: dk's default CPU backend
    out = tmp_path / "result.json"
    proc = subprocess.run([sys.executable, "-m", "integration.smoke_trl", "--out", str(out)], cwd=str(run.ROOT),
                          env=env, capture_output=True, text=True, timeout=900)
    assert out.is_file(), f"exit code {proc.returncode} without a result:\n{proc.stdout[-3000:]}{proc.stderr[-3000:]}"
    result = json.loads(out.read_text())
    assert result["status"] == "pass", "\n".join(result["reasons"]) + "\n" + json.dumps(result.get("tracebacks"))
    assert proc.returncode == 0


def test_check_of_a_pair_skips_the_dft_reference_and_an_absent_loss_check():
    """PAIRS (a trainer's other losses: EAFT, ASFT, GKD) are not DFT: no float64 DFT reference, and an
    integration without FusedLossCheck reports no checked micro-batches."""
    ours = _ours(reference_step1=None)
    del ours["checked_micro_batches"]
    assert common.check(ours, _run(0.25), reference=False) == []
    assert any("step-1 loss ours" in r for r in common.check(ours, _run(0.25 * (1 + 2e-5)), reference=False))


def test_table_has_a_row_per_pair():
    rows = [{"trainer": "llamafactory (use_asft_loss)", "version": "0.9.5", "status": "pass", "install_s": 0.0,
             "wall_s": 89.0, "ours_step1": 1.418357491, "theirs_step1": 1.418357491}]
    line = run.table(rows).splitlines()[2]
    assert line.startswith("| llamafactory (use_asft_loss) | 0.9.5 | pass | 1.418357491 | 1.418357491 | 0.0e+00")
