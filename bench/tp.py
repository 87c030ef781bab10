"""Vocab-parallel benchmark, under torchrun: every rank measures ours on the whole head and ours on its slice
of the head (``process_group`` = all ranks), on the same inputs; rank 0 writes the CSV and prints the table.

    torchrun --nproc_per_node 8 -m bench.tp                                   # NCCL, the GPU presets
    torchrun --nproc_per_node 2 -m bench.tp --cpu --shape 256,64,4096,fp32    # gloo on CPU (exercise only)

The vocab-parallel provider ``ours-tp<P>[backend]`` is loss-checked against ``ours[backend]`` on the whole
head (its slices' ``dW`` are gathered for the check, outside the timing).  Times are per rank (rank 0's
row); a TP step's time includes its collectives.  Options as ``python -m bench`` (``--shape``,
``--providers``, ``--out-dir``, ...); the file stem gets ``-tp<P>``.
"""

from __future__ import annotations

import os
import sys

import torch
import torch.distributed as dist
from torch import Tensor

import dft_kernels as dk

from . import env
from .check import Result, capture
from .cli import DEFAULT_OUT, build_parser, print_providers, selection
from .harness import run_shape
from .inputs import IGNORE_INDEX, Inputs
from .providers import FLOOR, Provider, Runner, Skip, _require_backend, ours
from .report import markdown_table, write_csv
from .timing import TimingConfig

__all__ = ["VocabParallelRunner", "ours_tp", "tp_providers", "main"]


def vocab_slice(vocab: int, rank: int, world: int) -> tuple[int, int]:
    """This rank's rows of the head: contiguous, in rank order, sizes differing by at most one."""
    sizes = [len(c) for c in torch.arange(vocab).tensor_split(world)]
    start = sum(sizes[:rank])
    return start, start + sizes[rank]


class VocabParallelRunner(Runner):
    """Ours on this rank's slice of ``inputs.w`` (a leaf of its own), the input replicated."""

    def __init__(self, inputs: Inputs, backend: str):
        self.group = dist.group.WORLD
        self.lo, self.hi = vocab_slice(inputs.w.shape[0], dist.get_rank(), dist.get_world_size())
        self.w_local = inputs.w.detach()[self.lo:self.hi].clone().requires_grad_(True)

        def loss(i: Inputs) -> Tensor:
            return dk.linear_cross_entropy(i.x, self.w_local, i.t, objective="dft", softcap=i.softcap,
                                           ignore_index=IGNORE_INDEX, backend=backend, process_group=self.group)
        super().__init__(inputs, loss)

    def step(self) -> Tensor:
        self.w_local.grad = None
        return super().step()

    def checked_step(self) -> Result:
        loss = self.step()
        full = torch.zeros_like(self.inputs.w)
        full[self.lo:self.hi] = self.w_local.grad
        dist.all_reduce(full, group=self.group)  # the whole dW, for the check only
        self.inputs.w.grad = full
        return capture(loss, self.inputs.x, self.inputs.w)

    @property
    def grad_bytes(self) -> int:
        x, w = self.inputs.x, self.w_local
        return x.numel() * x.element_size() + w.numel() * w.element_size()


def ours_tp(backend: str) -> Provider:
    def build(inp: Inputs, device: torch.device) -> Runner:
        if not dist.is_initialized() or dist.get_world_size() < 2:
            raise Skip("needs a process group of >= 2 ranks: torchrun --nproc_per_node N -m bench.tp")
        _require_backend(backend, device)
        return VocabParallelRunner(inp, backend)
    world = dist.get_world_size() if dist.is_initialized() else 1
    return Provider(f"ours-tp{world}[{backend}]", "ours", build,
                    f"dft_kernels, head split over {world} ranks (process_group), 1/{world} of dW per rank")


def tp_providers(device: torch.device) -> list[Provider]:
    """Ours on the whole head first (the loss-check reference), then vocab-parallel, then the floor."""
    order = ("triton", "torch") if device.type == "cuda" else ("torch",)
    return [ours(b) for b in order] + [ours_tp(b) for b in order] + [FLOOR]


def _init() -> torch.device:
    if "RANK" not in os.environ:
        raise SystemExit("bench.tp runs under torchrun: torchrun --nproc_per_node N -m bench.tp [options]")
    use_cuda = torch.cuda.is_available() and "--cpu" not in sys.argv
    if use_cuda:
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // int(os.environ.get("LOCAL_WORLD_SIZE", 1))))
    dist.init_process_group("nccl" if use_cuda else "gloo")
    return device


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    parser.prog = "torchrun --nproc_per_node N -m bench.tp"
    args = parser.parse_args(argv)
    device = _init()
    rank, world = dist.get_rank(), dist.get_world_size()
    try:
        providers = tp_providers(device)
        if args.list:
            if rank == 0:
                print_providers(providers)
            return 0
        providers, shapes = selection(args, providers)
        cfg = TimingConfig(warmup=args.warmup, reps=args.reps, max_seconds=args.max_seconds)
        name = env.device_name(device)
        log = (lambda msg: print(msg, file=sys.stderr, flush=True)) if rank == 0 else (lambda msg: None)
        rows = []
        for shape in shapes:
            rows += run_shape(shape, providers, device, cfg, device_name=name, seed=args.seed, log=log)
        if rank == 0:
            stem = args.name or env.device_slug(name if device.type == "cuda" else "cpu-" + name.removeprefix("CPU "))
            context = dict(env.versions(), commit=env.git_commit(), load_avg=env.load_average())
            csv_path = os.path.join(args.out_dir or DEFAULT_OUT, f"{stem}-tp{world}.csv")
            write_csv(rows, csv_path, context)
            print(f"[bench] wrote {csv_path}", file=sys.stderr)
            print(markdown_table([dict(r, **context) for r in rows]))
        return 0
    finally:
        dist.barrier()
        dist.destroy_process_group()


if __name__ == "__main__":
    sys.exit(main())
