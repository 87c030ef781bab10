"""The ``dk.patch`` tensor-parallel cases of test_vocab_parallel.py, run on every rank: a tiny Llama
loaded with transformers' ``tp_plan="auto"`` (DTensor, gloo on CPU; its LM head is ``Shard(0)`` over the
vocabulary), or with only its head sharded by torch's ``parallelize_module(..., ColwiseParallel())``, and
patched, against the same checkpoint loaded unsharded and patched in each process.

The patched TP forward + backward run under ``vocab_parallel_ranks.LocalTensorRecorder``, which sees every local tensor
op, including those DTensor runs for its own ops (collectives included); no op may output as many
elements as the whole head.
"""

from __future__ import annotations

import os
import tempfile
import warnings

import torch
import torch.distributed as dist
from vocab_parallel_ranks import VOCAB, LocalTensorRecorder, Metrics

import dft_kernels as dk
from helpers import rel_err


def _tiny_checkpoint(vocab: int, seed: int) -> str:
    """Rank 0 writes a random tiny Llama; every rank gets its path."""
    from transformers import LlamaConfig, LlamaForCausalLM

    path = [None]
    if dist.get_rank() == 0:
        path[0] = tempfile.mkdtemp(prefix="dk-tp-")
        cfg = LlamaConfig(vocab_size=vocab, hidden_size=32, intermediate_size=48, num_hidden_layers=1,
                          num_attention_heads=2, num_key_value_heads=2, tie_word_embeddings=False)
        torch.manual_seed(seed)
        LlamaForCausalLM(cfg).save_pretrained(path[0])
    dist.broadcast_object_list(path, src=0)
    return path[0]


def _grad(p) -> torch.Tensor:
    g = p.grad
    return g.full_tensor() if hasattr(g, "full_tensor") else g


def run_hf_case(case, rank: int, world: int, group):
    from torch.distributed.tensor import Shard
    from transformers import AutoModelForCausalLM

    vocab = VOCAB[world]
    path = _tiny_checkpoint(vocab, case.seed)
    objective = case.objective
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # transformers' TP loading and dk.patch's "not verified" (DTensor) notes
        if case.options.get("plan") == "parallelize_module":
            # only the head sharded, with torch's own ColwiseParallel (forward hooks, not a replaced forward)
            from torch.distributed.device_mesh import init_device_mesh
            from torch.distributed.tensor.parallel import ColwiseParallel, parallelize_module

            tp_model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
            parallelize_module(tp_model, init_device_mesh("cpu", (world,)), {"lm_head": ColwiseParallel()})
        else:
            try:
                tp_model = AutoModelForCausalLM.from_pretrained(path, tp_plan="auto", dtype=torch.float32)
            except ValueError as exc:
                # transformers before 5.2x gathers a colwise head only when V splits evenly (uneven slices are
                # still tested by the ColwiseParallel case): the largest such V below
                if "must be divisible by the tensor parallel size" not in str(exc):
                    raise
                vocab -= vocab % world
                path = _tiny_checkpoint(vocab, case.seed)
                tp_model = AutoModelForCausalLM.from_pretrained(path, tp_plan="auto", dtype=torch.float32)
        ref_model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
        dk.patch(tp_model, objective, chunk_size=8)
        dk.patch(ref_model, objective, chunk_size=8)
    # The input embedding has the head's [V, H] shape, and an unsharded one (the ColwiseParallel case)
    # allocates a dense [V, H] gradient: frozen, so that a head-sized tensor in the trace can only come
    # from the head and the loss.
    for model in (tp_model, ref_model):
        model.get_input_embeddings().weight.requires_grad_(False)
    dist.barrier()
    if rank == 0:
        for name in os.listdir(path):
            os.remove(os.path.join(path, name))
        os.rmdir(path)
    head = tp_model.get_output_embeddings().weight
    assert tuple(head.placements) == (Shard(0),), head.placements  # the head really is vocab-sharded
    full_head = head.shape[0] * head.shape[1]

    g = torch.Generator().manual_seed(case.seed)
    ids = torch.randint(0, vocab, (2, 12), generator=g)
    labels = ids.clone()
    labels[0, :3] = -100
    tp_model.train()
    ref_model.train()
    with LocalTensorRecorder() as rec:
        loss = tp_model(input_ids=ids, labels=labels).loss
        loss.backward()
    ref_loss = ref_model(input_ids=ids, labels=labels).loss
    ref_loss.backward()

    m = Metrics()
    # transformers' TP model computes attention and MLP in another order: float32 rounding of the backbone
    tol = 1e-5
    m.add("loss", rel_err(loss, ref_loss), tol)
    ref_params = dict(ref_model.named_parameters())
    for name, p in tp_model.named_parameters():
        if p.requires_grad:
            m.add(f"grad {name}", rel_err(_grad(p), ref_params[name].grad), tol)
    m.add("fused loss calls", abs(tp_model.dft_kernels_fused_calls - 1), 0.0)
    m.add(f"largest local tensor / full head ({rec.largest_op})", rec.largest / full_head, 0.999)
    # the recorder does see a gathered head (what dk.patch did before: weight.full_tensor())
    with LocalTensorRecorder() as control:
        head.full_tensor()
    m.add("recorder sees a gathered head", float(control.largest < full_head), 0.0)
    return m
