"""dk.patch / dk.unpatch on Hugging Face causal LMs (tiny random models built here, no downloads).

Every check compares the patched float32 model with a float64 copy of the *unpatched*
model whose logits go through the float64 oracle ``dk.reference.cross_entropy``.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

import dft_kernels as dk
from dft_kernels import hf as dkhf
from helpers import rel_err

transformers = pytest.importorskip("transformers")

V = 97  # odd vocabulary, not a power of two
# A well-conditioned backbone (small init) keeps float32's own error in the whole-model gradients
# ~1e-6; the head gets std 0.3 in make_model so the logits have std ~2 and DFT's weights p vary.
BASE = dict(vocab_size=V, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, initializer_range=0.05, pad_token_id=0, bos_token_id=1, eos_token_id=2)


def _config(name):
    t = transformers
    if name == "llama":
        return t.LlamaConfig(**BASE)
    if name == "qwen2":
        return t.Qwen2Config(**BASE)
    if name == "mistral":
        return t.MistralConfig(**BASE)
    if name == "gemma2":  # final_logit_softcapping: small cap so the tanh really bends the logits
        return t.Gemma2Config(**BASE, head_dim=8, final_logit_softcapping=3.0, attn_implementation="eager")
    if name == "cohere":  # logits * logit_scale, tied head
        return t.CohereConfig(**BASE, logit_scale=0.7)
    if name == "granite":  # logits / logits_scaling
        return t.GraniteConfig(**BASE, logits_scaling=1.6)
    if name == "phi":  # lm_head with bias
        return t.PhiConfig(**BASE, resid_pdrop=0.0, embd_pdrop=0.0, attention_dropout=0.0)
    raise KeyError(name)


MODELS = ["llama", "qwen2", "mistral", "gemma2", "cohere", "granite", "phi"]


def make_model(name="llama"):
    model = transformers.AutoModelForCausalLM.from_config(_config(name))
    head = model.get_output_embeddings()
    with torch.no_grad():
        head.weight.normal_(0.0, 0.3)  # (tied models: the embedding too)
        if head.bias is not None:  # HF zero-initialises biases; make the bias matter
            head.bias.normal_(0.0, 0.5)
    return model.float()


def make_batch(batch=2, seq=12, pad=3, prompt=2):
    ids = torch.randint(3, V, (batch, seq))
    mask = torch.ones(batch, seq, dtype=torch.long)
    mask[-1, seq - pad:] = 0  # right padding on the last row
    ids[mask == 0] = 0
    labels = ids.clone()
    labels[mask == 0] = -100
    labels[:, :prompt] = -100  # a prompt that is not trained on
    return ids, mask, labels


def reference_loss(model, ids, mask, labels, objective, *, reduction="mean", num_items=None, **kwargs):
    """float64 copy of the *unpatched* model -> logits -> float64 oracle; returns (loss, copy)."""
    ref = copy.deepcopy(model)
    dk.unpatch(ref)
    ref = ref.double()
    logits = ref(input_ids=ids, attention_mask=mask).logits
    loss = dk.reference.cross_entropy(logits, labels, objective=objective, shift=True, reduction=reduction,
                                      num_items_in_batch=num_items, **kwargs)
    return loss, ref


def assert_grads_match(model, ref):
    ref_params = dict(ref.named_parameters())
    checked = 0
    for name, p in model.named_parameters():
        rg = ref_params[name].grad
        assert p.grad is not None and rg is not None, name
        assert torch.isfinite(p.grad).all(), name
        if rg.norm() == 0:
            assert p.grad.abs().max() < 1e-12, f"{name} grad should be zero"
            continue
        err = rel_err(p.grad, rg)
        assert err <= 1e-5, f"{name} grad rel err {err:.3e}"
        checked += 1
    assert checked > 0


@pytest.mark.parametrize("objective", ["ce", "dft"])
@pytest.mark.parametrize("name", MODELS)
def test_patched_loss_and_grads_match_reference(name, objective):
    model = make_model(name)
    ids, mask, labels = make_batch()
    ref_loss, ref = reference_loss(model, ids, mask, labels, objective)
    dk.patch(model, objective, chunk_size=8)
    model.train()
    out = model(input_ids=ids, attention_mask=mask, labels=labels)
    assert out.logits is None
    assert model.dft_kernels_fused_calls == 1
    err = rel_err(out.loss, ref_loss)
    assert err <= 1e-5, f"{name}/{objective} loss rel err {err:.3e}"
    out.loss.backward()
    ref_loss.backward()
    assert_grads_match(model, ref)


def test_head_spec_is_read_from_the_model():
    spec = dkhf.head_spec(make_model("gemma2"))
    assert spec.softcap == 3.0 and spec.scale == 1.0
    spec = dkhf.head_spec(make_model("cohere"))
    assert spec.softcap is None and spec.scale == pytest.approx(0.7)
    spec = dkhf.head_spec(make_model("granite"))
    assert spec.scale == pytest.approx(1 / 1.6)


def test_loss_options_num_items_ignore_index_token_weights():
    model = make_model("llama")
    ids, mask, labels = make_batch()
    labels[labels == -100] = -1
    tw = torch.rand(labels.shape, dtype=torch.float64) + 0.5
    num_items = 37
    ref_loss, ref = reference_loss(model, ids, mask, labels, dk.DFT(min_weight=0.1), num_items=num_items,
                                   ignore_index=-1, z_loss=1e-2, label_smoothing=0.1, token_weights=tw)
    dk.patch(model, dk.DFT(min_weight=0.1), chunk_size=4, z_loss=1e-2, label_smoothing=0.1)
    model.train()
    out = model(input_ids=ids, attention_mask=mask, labels=labels, num_items_in_batch=torch.tensor(num_items),
                ignore_index=-1, token_weights=tw.float())
    assert rel_err(out.loss, ref_loss) <= 1e-5
    out.loss.backward()
    ref_loss.backward()
    assert_grads_match(model, ref)


def test_shift_labels_and_logits_to_keep():
    model = make_model("qwen2")
    ids, mask, labels = make_batch(pad=0)
    ref = copy.deepcopy(model).double()
    logits = ref(input_ids=ids, attention_mask=mask).logits
    dk.patch(model, "dft", chunk_size=4)
    model.train()
    # pre-shifted targets (context-parallel style): no further shift
    shifted = torch.nn.functional.pad(labels[:, 1:], (0, 1), value=-100)
    out = model(input_ids=ids, attention_mask=mask, labels=labels, shift_labels=shifted)
    want = dk.reference.cross_entropy(logits, shifted, objective="dft")
    assert rel_err(out.loss, want) <= 1e-5
    # logits_to_keep=k: labels cover the last k positions, shifted within them (as HF does)
    k = 5
    out = model(input_ids=ids, attention_mask=mask, labels=labels[:, -k:], logits_to_keep=k)
    want = dk.reference.cross_entropy(logits[:, -k:], labels[:, -k:], objective="dft", shift=True)
    assert rel_err(out.loss, want) <= 1e-5
    with pytest.raises(ValueError, match="logits_to_keep"):
        model(input_ids=ids, labels=labels, logits_to_keep=k)


def test_reduction_none_gives_per_token_losses():
    """verl-style: per-token losses (B, T-1), zero at ignored positions, gradients through a weighted sum."""
    model = make_model("phi")
    ids, mask, labels = make_batch()
    ref_tok, ref = reference_loss(model, ids, mask, labels, "dft", reduction="none")
    dk.patch(model, "dft", reduction="none", chunk_size=4)
    model.train()
    tok = model(input_ids=ids, attention_mask=mask, labels=labels).loss
    assert tok.shape == (ids.shape[0], ids.shape[1] - 1) == ref_tok.shape
    assert rel_err(tok, ref_tok) <= 1e-5
    assert (tok[labels[:, 1:] == -100] == 0).all()
    w = torch.rand(tok.shape, dtype=torch.float64) + 0.5  # e.g. advantages / a loss mask
    (tok * w.float()).sum().backward()
    (ref_tok * w).sum().backward()
    assert_grads_match(model, ref)


def test_head_hooks_run_around_the_fused_loss():
    """FSDP/DeepSpeed gather the head's parameters in module hooks, accelerate in a forward wrapper:
    the fused loss runs inside the head's call, so both see it (and the loss is still right)."""
    hooks = pytest.importorskip("accelerate.hooks")
    model = make_model("llama")
    ids, mask, labels = make_batch()
    ref_loss, ref = reference_loss(model, ids, mask, labels, "dft")
    seen = {"torch_hook": 0, "accelerate_hook": 0}

    class Count(hooks.ModelHook):
        def pre_forward(self, module, *args, **kwargs):
            seen["accelerate_hook"] += 1
            return args, kwargs

    hooks.add_hook_to_module(model.lm_head, Count())
    model.lm_head.register_forward_pre_hook(lambda m, a: seen.__setitem__("torch_hook", seen["torch_hook"] + 1))
    dk.patch(model, "dft", chunk_size=4, verify=False)
    head_fwd = dict(model.lm_head.__dict__)
    model.train()
    out = model(input_ids=ids, attention_mask=mask, labels=labels)
    assert seen == {"torch_hook": 1, "accelerate_hook": 1}
    for attr in ("forward", "_old_forward"):  # the head's own forward is restored after the call
        assert model.lm_head.__dict__[attr] is head_fwd[attr]
    assert rel_err(out.loss, ref_loss) <= 1e-5
    out.loss.backward()
    ref_loss.backward()
    assert_grads_match(model, ref)


class ShapeRecorder(TorchDispatchMode):
    """Records the shape of every tensor an op produces."""

    def __init__(self):
        super().__init__()
        self.shapes = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in torch.utils._pytree.tree_leaves(out):
            if isinstance(t, torch.Tensor):
                self.shapes.append(tuple(t.shape))
        return out


def _largest_logits_rows(shapes):
    """Size, in vocabulary-long rows, of the largest tensor with a vocabulary-sized dimension."""
    rows = [torch.Size(s).numel() // V for s in shapes if V in s]
    return max(rows, default=0)


def test_fused_path_never_builds_token_by_vocab_logits():
    model = make_model("llama")
    ids, mask, labels = make_batch(batch=2, seq=40)
    tokens = ids.numel()  # 80 > 2 * hidden_size, so W and dW ([V, 32]) stay below tokens / 2 rows
    model.train()
    # The recorder does see the logits of the unpatched model (so the check below can fail).
    with ShapeRecorder() as rec:
        model(input_ids=ids, attention_mask=mask, labels=labels).loss.backward()
    assert _largest_logits_rows(rec.shapes) >= tokens
    model.zero_grad()
    dk.patch(model, "dft", chunk_size=8)
    assert model.dft_kernels_objective == dk.DFT()
    assert model.dft_kernels_fused_calls == 0
    with ShapeRecorder() as rec:
        out = model(input_ids=ids, attention_mask=mask, labels=labels)
        out.loss.backward()
    assert model.dft_kernels_fused_calls == 1
    assert out.logits is None
    assert 0 < _largest_logits_rows(rec.shapes) < tokens // 2


def test_patch_twice_is_noop_and_unpatch_restores():
    model = make_model("mistral")
    ids, mask, labels = make_batch()
    model.train()
    before = model(input_ids=ids, attention_mask=mask, labels=labels)
    assert "forward" not in model.__dict__
    assert dk.patch(model, "dft") is model
    fwd = model.__dict__["forward"]
    dk.patch(model, "dft")  # same options: no-op
    assert model.__dict__["forward"] is fwd
    assert dkhf.is_patched(model)
    with pytest.raises(ValueError, match="already patched"):
        dk.patch(model, "ce")
    assert model(input_ids=ids, attention_mask=mask, labels=labels).logits is None
    dk.unpatch(model)
    assert not dkhf.is_patched(model)
    assert "forward" not in model.__dict__
    assert not hasattr(model, "dft_kernels_objective")
    after = model(input_ids=ids, attention_mask=mask, labels=labels)
    assert after.logits is not None
    torch.testing.assert_close(after.loss, before.loss, rtol=0, atol=0)
    dk.unpatch(model)  # unpatching an unpatched model is a no-op
    # a wrapper installed on top of the patch (as TRL does) survives unpatch and reaches the original
    dk.patch(model, "dft")
    inner = model.forward
    model.forward = lambda *a, **k: inner(*a, **k)
    dk.unpatch(model)
    wrapped = model(input_ids=ids, attention_mask=mask, labels=labels)
    assert wrapped.logits is not None
    torch.testing.assert_close(wrapped.loss, before.loss, rtol=0, atol=0)
    del model.forward
    # patch again after unpatch works, and a hook added to the backbone after that still runs
    dk.patch(model, "ce")
    assert model(input_ids=ids, attention_mask=mask, labels=labels).logits is None


def test_without_labels_and_generate_behave_like_unpatched():
    model = make_model("gemma2")
    model.eval()
    ids, mask, _ = make_batch(pad=0)
    with torch.no_grad():
        plain_logits = model(input_ids=ids, attention_mask=mask).logits
        plain_gen = model.generate(ids, attention_mask=mask, max_new_tokens=6, do_sample=False,
                                   pad_token_id=0)
    dk.patch(model, "dft")
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=mask).logits
        gen = model.generate(ids, attention_mask=mask, max_new_tokens=6, do_sample=False, pad_token_id=0)
    torch.testing.assert_close(logits, plain_logits, rtol=0, atol=0)
    assert torch.equal(gen, plain_gen)
    assert gen.shape[1] > ids.shape[1]
    assert model.dft_kernels_fused_calls == 0
    model.train()
    with torch.no_grad():  # training mode, no labels: still the original forward
        torch.testing.assert_close(model(input_ids=ids, attention_mask=mask).logits, plain_logits)
    # ... and with gradients the caller computes the loss: that is worth one warning
    with pytest.warns(UserWarning, match="model type 'gemma2'.*without labels"):
        model(input_ids=ids, attention_mask=mask)
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        model(input_ids=ids, attention_mask=mask)  # warned once per model


def test_eval_with_labels_keeps_logits_and_uses_the_objective():
    model = make_model("cohere")
    ids, mask, labels = make_batch()
    ref_loss, _ = reference_loss(model, ids, mask, labels, "dft")
    dk.patch(model, "dft")
    model.eval()
    with torch.no_grad():
        out = model(input_ids=ids, attention_mask=mask, labels=labels)
    assert out.logits is not None and out.logits.shape == (*ids.shape, V)
    assert rel_err(out.loss, ref_loss) <= 1e-5
    assert model.dft_kernels_fused_calls == 0
    # return_dict=False gives a tuple with the loss first, as HF models do
    model.train()
    tup = model(input_ids=ids, attention_mask=mask, labels=labels, return_dict=False)
    assert isinstance(tup, tuple) and rel_err(tup[0], ref_loss) <= 1e-5


# ------------------------------------------------------------------ refusals, never silent


class ScaledLlama(transformers.LlamaForCausalLM):
    """A model whose forward scales its logits in a way the config does not announce (as a new
    transformers release might)."""

    def forward(self, *args, **kwargs):
        out = super().forward(*args, **kwargs)
        out.logits = out.logits * 3.0
        return out


class HiddenSoftcapLlama(transformers.LlamaForCausalLM):
    """Softcaps its logits without a config attribute; tiny random logits hide it unless amplified."""

    def forward(self, *args, **kwargs):
        out = super().forward(*args, **kwargs)
        out.logits = 30.0 * torch.tanh(out.logits / 30.0)
        return out


@pytest.mark.parametrize("cls", [ScaledLlama, HiddenSoftcapLlama])
def test_unknown_head_transform_is_refused(cls):
    cfg = transformers.LlamaConfig(**{**BASE, "initializer_range": 0.02})
    model = cls(cfg)
    with pytest.raises(dkhf.PatchError, match="model type 'llama' \\(" + cls.__name__ + r"\).*differ"):
        dk.patch(model, "dft")
    assert not dkhf.is_patched(model)
    assert "forward" not in model.__dict__
    # the check restored the head weight exactly and left the training flags alone
    fresh = cls(cfg)
    fresh.load_state_dict(model.state_dict())
    assert model.training == fresh.training


def test_verification_leaves_weights_rng_and_modes_untouched():
    model = make_model("gemma2")
    model.train()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    rng = torch.get_rng_state()
    dk.patch(model, "dft", verify=True)
    assert torch.equal(torch.get_rng_state(), rng)
    assert all(m.training for m in model.modules())
    for k, v in model.state_dict().items():
        assert torch.equal(v, state[k]), k


def test_unsupported_models_get_clear_errors():
    t = transformers
    bert = t.BertForSequenceClassification(t.BertConfig(vocab_size=V, hidden_size=32, num_hidden_layers=1,
                                                        num_attention_heads=4, intermediate_size=64))
    with pytest.raises(dkhf.PatchError, match="model type 'bert'.*no output embeddings"):
        dk.patch(bert)
    t5 = t.T5ForConditionalGeneration(t.T5Config(vocab_size=V, d_model=32, d_ff=64, num_layers=1, num_heads=4,
                                                 d_kv=8))
    with pytest.raises(dkhf.PatchError, match="model type 't5'.*encoder-decoder"):
        dk.patch(t5)
    moe = t.MixtralForCausalLM(t.MixtralConfig(**BASE, num_local_experts=4, num_experts_per_tok=2,
                                               output_router_logits=True))
    with pytest.raises(dkhf.PatchError, match="model type 'mixtral'.*router"):
        dk.patch(moe)
    llama = make_model("llama")

    class NotLinear(nn.Module):
        def __init__(self, lin):
            super().__init__()
            self.weight = lin.weight
            self.bias = None

        def forward(self, x):
            return 2 * nn.functional.linear(x, self.weight)

    llama.lm_head = NotLinear(llama.lm_head)
    with pytest.raises(dkhf.PatchError, match="model type 'llama'.*NotLinear"):
        dk.patch(llama)

    class Wrapper(nn.Module):
        def __init__(self, m):
            super().__init__()
            self.module = m

    with pytest.raises(TypeError, match="Wrapper wrapping LlamaForCausalLM"):
        dk.patch(Wrapper(make_model("llama")))
    with pytest.raises(TypeError, match="must be a torch.nn.Module"):
        dk.patch("llama")


def test_bad_patch_arguments():
    model = make_model("llama")
    with pytest.raises(TypeError, match="'softcap'.*final_logit_softcapping"):
        dk.patch(model, softcap=30.0)
    with pytest.raises(TypeError, match="unexpected keyword argument 'chunksize'"):
        dk.patch(model, chunksize=4)
    with pytest.raises(ValueError, match="objective"):
        dk.patch(model, "nope")
    with pytest.raises(ValueError, match="label_smoothing"):
        dk.patch(model, "focal", label_smoothing=0.1)
    with pytest.raises(ValueError, match="verify"):
        dk.patch(model, verify="yes")
    assert not dkhf.is_patched(model)


def test_bypassing_the_patched_forward_raises():
    model = make_model("llama")
    ids, mask, labels = make_batch()
    dk.patch(model, "dft")
    model.train()
    with pytest.raises(RuntimeError, match="model type 'llama'.*bypassed"):
        model.model(input_ids=ids, attention_mask=mask)
    with torch.no_grad():  # reading hidden states without gradients is fine
        model.model(input_ids=ids, attention_mask=mask)
    model.eval()
    model.model(input_ids=ids, attention_mask=mask)


def test_liger_is_a_clear_error_on_cpu(monkeypatch):
    model = make_model("llama")
    import importlib.util
    import sys

    if importlib.util.find_spec("liger_kernel") is not None:
        with pytest.raises(ValueError, match="liger=True.*need CUDA.*model type 'llama'.*cpu"):
            dk.patch(model, liger=True)
    monkeypatch.setitem(sys.modules, "liger_kernel", None)  # simulate "not installed"
    monkeypatch.setitem(sys.modules, "liger_kernel.transformers", None)
    with pytest.raises(ImportError, match="pip install liger-kernel"):
        dk.patch(model, liger=True)
    assert not dkhf.is_patched(model)


def test_compute_loss_func_matches_reference():
    model = make_model("granite")
    ids, mask, labels = make_batch()
    ref_loss, ref = reference_loss(model, ids, mask, labels, "dft", num_items=29)
    fn = dkhf.compute_loss_func("dft", chunk_size=4)
    logits = model(input_ids=ids, attention_mask=mask).logits
    loss = fn(model(input_ids=ids, attention_mask=mask), labels, num_items_in_batch=29)
    assert rel_err(loss, ref_loss) <= 1e-5
    assert rel_err(fn({"logits": logits}, labels, num_items_in_batch=torch.tensor(29)), ref_loss) <= 1e-5
    with pytest.raises(TypeError, match="reduction"):
        dkhf.compute_loss_func("dft", reduction="none")


# ------------------------------------------------------------------ the anchor (ASFT): kl_coef, ref_hidden_states

def _anchored_reference(model, ref_model, ids, mask, labels, objective, kl_coef, kl, softcap):
    """float64 copies of both unpatched models -> hidden states -> the float64 oracle; returns (loss, copy)."""
    pol = copy.deepcopy(model)
    dk.unpatch(pol)
    pol = pol.double()
    ref = copy.deepcopy(ref_model).double()
    h = pol.get_decoder()(input_ids=ids, attention_mask=mask).last_hidden_state
    with torch.no_grad():
        rh = ref.get_decoder()(input_ids=ids, attention_mask=mask).last_hidden_state
    head, rhead = pol.get_output_embeddings(), ref.get_output_embeddings()
    loss = dk.reference.linear_cross_entropy(h, head.weight, labels, bias=head.bias, ref_input=rh,
                                             ref_weight=rhead.weight, ref_bias=rhead.bias, objective=objective,
                                             shift=True, kl_coef=kl_coef, kl=kl, softcap=softcap)
    return loss, pol


@pytest.mark.parametrize("kl", ["forward", "reverse"])
@pytest.mark.parametrize("name", ["llama", "gemma2", "phi"])
def test_patched_anchor_matches_reference(name, kl):
    model = make_model(name)
    ref_model = make_model(name).eval().requires_grad_(False)  # another init: the KL is far from zero
    ids, mask, labels = make_batch()
    softcap = getattr(model.config, "final_logit_softcapping", None)
    want, pol = _anchored_reference(model, ref_model, ids, mask, labels, "dft", 0.2, kl, softcap)
    dk.patch(model, "dft", chunk_size=8, kl_coef=0.2, kl=kl)
    model.train()
    with torch.no_grad():
        rh = ref_model.get_decoder()(input_ids=ids, attention_mask=mask).last_hidden_state
    out = model(input_ids=ids, attention_mask=mask, labels=labels, ref_hidden_states=rh,
                ref_lm_head=ref_model.get_output_embeddings())
    assert rel_err(out.loss, want) <= 1e-5
    out.loss.backward()
    want.backward()
    assert_grads_match(model, pol)
    assert all(p.grad is None for p in ref_model.parameters())
    # the anchor is in the loss: without it (kl_coef=0) the value differs
    plain, _ = _anchored_reference(model, ref_model, ids, mask, labels, "dft", 0.0, kl, softcap)
    assert abs(float(want - plain)) > 1e-3 * float(plain)


def test_patched_anchor_needs_the_reference_and_names_it():
    model = make_model("llama")
    ref_model = make_model("llama").eval()
    ids, mask, labels = make_batch()
    dk.patch(model, "dft", kl_coef=0.1)
    model.train()
    with pytest.raises(ValueError, match="kl_coef=0.1 .*ref_hidden_states=.*ref_lm_head="):
        model(input_ids=ids, attention_mask=mask, labels=labels)
    with torch.no_grad():
        rh = ref_model.get_decoder()(input_ids=ids, attention_mask=mask).last_hidden_state
    with pytest.raises(ValueError, match="^ref_lm_head is missing"):
        model(input_ids=ids, attention_mask=mask, labels=labels, ref_hidden_states=rh)
    with pytest.raises(ValueError, match="^ref_hidden_states covers"):
        model(input_ids=ids, attention_mask=mask, labels=labels, ref_hidden_states=rh[:, 1:],
              ref_lm_head=ref_model.get_output_embeddings())
    with pytest.raises(TypeError, match="^ref_lm_head must be"):
        model(input_ids=ids, attention_mask=mask, labels=labels, ref_hidden_states=rh, ref_lm_head=rh)
    # eval mode with labels: the objective's loss alone (the anchor is a training term), the kwargs accepted
    model.eval()
    out = model(input_ids=ids, attention_mask=mask, labels=labels, ref_hidden_states=rh,
                ref_lm_head=ref_model.get_output_embeddings())
    want = dk.reference.cross_entropy(out.logits.double(), labels, objective="dft", shift=True)
    assert rel_err(out.loss, want) <= 1e-5
    # without labels (generate): the original forward, the reference kwargs dropped
    assert model(input_ids=ids, ref_hidden_states=rh, ref_lm_head=ref_model.get_output_embeddings()).logits \
        is not None
