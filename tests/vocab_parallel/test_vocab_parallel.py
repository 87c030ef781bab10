"""Vocab-parallel head (docs/distributed.md) on gloo process groups of 2 and 3 CPU processes.

Every rank holds a slice of a random head (V = 257 over 2 ranks, 1001 over 3; even and skewed slice
sizes) and compares the loss, the stats, dX and its own dW/db slice with the single-process float64
reference on the whole head (tests/vocab_parallel/vocab_parallel_ranks.py): every objective with every reduction,
each option on and off, the given-logits path, exact ties at the argmax, the Triton split kernels under
TRITON_INTERPRET=1, DTensor operands, a transformers ``tp_plan="auto"`` model under ``dk.patch``
(tests/vocab_parallel/vocab_parallel_hf.py), and inconsistent calls that must raise on every rank.  One process group
per world size runs all of its cases (starting one costs seconds); after a case that raised, a new one
runs the cases after it.
"""

import importlib.util

import pytest
import torch.distributed as dist
from conftest import triton_cpu_unavailable_reason
from process_group import RankFailure, run_ranks
from vocab_parallel_ranks import FIRST_ERROR, cases, run_cases

pytestmark = pytest.mark.skipif(not dist.is_available(), reason="torch built without torch.distributed")

WORLD_SIZES = (2, 3)


def _param(world: int, case):
    marks = []
    if case.backend == "triton" and triton_cpu_unavailable_reason():
        marks.append(pytest.mark.skip(reason=f"triton backend on CPU tensors: {triton_cpu_unavailable_reason()}"))
    if case.kind == "hf" and importlib.util.find_spec("transformers") is None:
        marks.append(pytest.mark.skip(reason="transformers is not installed"))
    return pytest.param(world, case.name, id=f"{world}ranks-{case.name}", marks=marks)


CASES = [_param(world, case) for world in WORLD_SIZES for case in cases(world)]


# after a case raises, the rest of its group runs again in a fresh group (a start costs seconds), at
# most this many times per world size
RESTARTS = 3


def _run_group(world: int, names: list) -> tuple:
    """``(per-rank {case name: result}, why a case missing from them did not run)`` for ``names``.

    A rank stops at the first case that raises (the ranks may be out of step after it), so the cases
    after the first one that raised on any rank run again in a new group: each reports on its own."""
    order = [c.name for c in cases(world) if c.name in set(names)]
    merged = [{} for _ in range(world)]
    for _ in range(1 + RESTARTS):
        try:
            results, failure = run_ranks(run_cases, world, order), None
        except RankFailure as exc:
            results, failure = exc.results, str(exc)
        if any(r is None for r in results):  # a rank died: how far the others got proves nothing
            return merged, f"the group failed: {failure}"
        raised = [r[FIRST_ERROR] for r in results if FIRST_ERROR in r]
        first = min((order.index(n) for n in raised), default=len(order))
        for rank, r in enumerate(results):
            merged[rank].update({n: r[n] for n in order[:first + 1] if n in r})
        if first >= len(order) - 1:
            return merged, None
        order = order[first + 1:]
    return merged, f"the group was restarted {RESTARTS} times after cases that raised; the last was {raised}"


@pytest.fixture(scope="module")
def group_results():
    """``world -> (per-rank results, why a case missing from them did not run)``, one run per module."""
    cache = {}

    def get(world: int, names: list):
        if world not in cache:
            cache[world] = _run_group(world, names)
        return cache[world]

    return get


@pytest.fixture(scope="module")
def selected(request):
    """The case names this session runs, per world size (so ``-k`` starts groups only for what it selects)."""
    names = {}
    for item in request.session.items:
        callspec = getattr(item, "callspec", None)
        if item.module is request.module and callspec is not None and item.get_closest_marker("skip") is None:
            names.setdefault(callspec.params["world"], []).append(callspec.params["name"])
    return names


@pytest.mark.parametrize("world,name", CASES)
def test_vocab_parallel_matches_reference(group_results, selected, world, name):
    results, why = group_results(world, selected[world])
    for rank, per_case in enumerate(results):
        if name not in per_case:
            pytest.fail(f"rank {rank} did not run this case; {why}")
        result = per_case[name]
        if "error" in result:
            pytest.fail(f"rank {rank} raised:\n{result['error']}")
        bad = {metric: f"{value:.3e} > {tol:g}" for metric, (value, tol) in result["metrics"].items()
               if not value <= tol}
        assert not bad, f"rank {rank}: {bad}"
