"""Hugging Face transformers models built from configs (tiny, random weights): every method with the model's
default settings (its key/value cache on), GPT-2's Conv1D and tied lm_head, per-token activations, SmoothQuant
factors, convert / save / load into the float architecture, merge, torch.compile and generate.

Skipped when transformers is not installed (``pip install -e ".[real]"``)."""
import warnings

import pytest
import torch
from torch import nn

import hdrq
from hdrq.calib import smooth_factors, smooth_scales, unquantizable_layers
from hdrq.nn import QLinear
from hdrq.quant import QuantLinear, Quantizer

transformers = pytest.importorskip("transformers")

VOCAB = 64


def _decoder(cls_name: str, cfg_name: str, **extra):
    def build():
        cfg = getattr(transformers, cfg_name)(vocab_size=VOCAB, hidden_size=32, intermediate_size=64,
                                              num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                              max_position_embeddings=64, **extra)
        return getattr(transformers, cls_name)(cfg)
    return build


def _gpt2():
    cfg = transformers.GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_positions=64, bos_token_id=0,
                                  eos_token_id=0)
    return transformers.GPT2LMHeadModel(cfg)


def _opt():
    cfg = transformers.OPTConfig(vocab_size=VOCAB, hidden_size=32, ffn_dim=64, num_hidden_layers=2,
                                 num_attention_heads=4, max_position_embeddings=64, word_embed_proj_dim=32)
    return transformers.OPTForCausalLM(cfg)


def _bert():
    cfg = transformers.BertConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                  num_attention_heads=4, max_position_embeddings=64)
    return transformers.BertModel(cfg)


FAMILIES = {
    "llama": _decoder("LlamaForCausalLM", "LlamaConfig"),
    "mistral": _decoder("MistralForCausalLM", "MistralConfig"),
    "qwen2": _decoder("Qwen2ForCausalLM", "Qwen2Config"),
    "gpt2": _gpt2,
    "opt": _opt,
    "bert": _bert,
}


def _build(family: str, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return FAMILIES[family]().eval()


def _out(model, ids):
    out = model(ids)
    return out.logits if hasattr(out, "logits") else out.last_hidden_state


def _ids(seed=1, n=8, t=10):
    return torch.randint(0, VOCAB, (n, t), generator=torch.Generator().manual_seed(seed))


def _quantize(model, ids, method, **kw):
    iters = dict(iters=2, act_iters=2 if method == "brecq" else None) if method != "rtn" else {}
    cfg = hdrq.QuantConfig.preset(method, w_bits=8, a_bits=8, calib_batch_size=4, verbose=False, **iters, **kw)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        return hdrq.quantize(model, ids, cfg, source=model if method == "hdrq" else None)


# ------------------------------------------------------------------------------------------------
# Every family, every method, the model's defaults (use_cache=True)
# ------------------------------------------------------------------------------------------------


# qdrop runs for every family in the default suite (reconstruction with the model's cache on: the case that
# failed); the whole matrix is marked slow.
@pytest.mark.parametrize("method", ["qdrop"] + [pytest.param(m, marks=pytest.mark.slow) for m in ("rtn", "brecq",
                                                                                                  "hdrq")])
@pytest.mark.parametrize("family", list(FAMILIES))
def test_every_family_every_method(family, method):
    model = _build(family)
    use_cache = getattr(model.config, "use_cache", None)
    ids = _ids()
    q = _quantize(model, ids, method)
    layers = [m for m in q.modules() if isinstance(m, QuantLinear)]
    assert layers and not any(isinstance(m, nn.Linear) for m in q.modules())  # every projection quantized
    with torch.no_grad():
        assert all(torch.equal(m.weight, m.quantized_weight()) for m in layers)  # the hard-quantized state
    assert getattr(q.config, "use_cache", None) == use_cache  # the model's own setting is given back
    with torch.no_grad():
        ref, got = _out(model, ids), _out(q, ids)
    assert torch.isfinite(got).all()
    assert (got - ref).norm() / ref.norm() < 0.1
    assert not any(p.grad is not None for p in q.parameters())


def test_stateful_block_argument_is_copied_per_call():
    """A block receiving a transformers cache it appends to (the model called with use_cache=True
    explicitly): each reconstruction call gets a fresh copy, so no state or graph leaks between calls."""
    model = _build("llama")

    class Explicit(nn.Module):
        def __init__(self, m):
            super().__init__()
            self.m = m

        def forward(self, ids):
            return self.m(ids, use_cache=True).logits

    ids = _ids()
    q = _quantize(Explicit(model), ids, "qdrop")
    with torch.no_grad():
        ref, got = model(ids).logits, q(ids)
    assert (got - ref).norm() / ref.norm() < 0.1


# ------------------------------------------------------------------------------------------------
# GPT-2: Conv1D, the tied lm_head, convert / save / load into the float model, merge
# ------------------------------------------------------------------------------------------------


def test_gpt2_conv1d_quantized_and_lm_head_tied(tmp_path):
    model = _build("gpt2")
    ids = _ids()
    assert model.lm_head.weight is model.transformer.wte.weight
    cfg = hdrq.QuantConfig.transformer("hdrq", w_bits=8, a_bits=8, iters=2, calib_batch_size=4, verbose=False)
    with pytest.warns(UserWarning, match=r"'transformer.wte' \(Embedding.*tied to 'lm_head'"):
        q = hdrq.quantize(model, ids, cfg, source=model)
    for name in ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj"):
        layer = q.transformer.h[0].get_submodule(name)
        assert isinstance(layer, QuantLinear) and layer.smooth is not None
    assert q.lm_head.weight is q.transformer.wte.weight  # still tied, to the quantized weight
    assert q.lm_head.smooth is None  # a tied weight is shared as it is
    report = {r["name"]: r for r in q.hdrq_report}
    assert "tied" in report["lm_head"]["note"] and report["lm_head"]["iters"] == 0
    with torch.no_grad():
        ref, fq = model(ids).logits, q(ids).logits
    assert (fq - ref).norm() / ref.norm() < 0.05

    c = hdrq.convert(q, verbose=False)
    assert isinstance(c.transformer.h[1].mlp.c_fc, QLinear) and c.transformer.h[1].mlp.c_fc.act == "dynamic"
    with torch.no_grad():
        conv = c(ids).logits
    torch.testing.assert_close(conv, fq, rtol=1e-4, atol=1e-4)
    path = tmp_path / "gpt2.safetensors"
    hdrq.save(c, path)
    loaded = hdrq.load(path, model=_build("gpt2", seed=5))  # the float architecture, Conv1D included
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, conv, rtol=0, atol=0)
    assert torch.equal(loaded.transformer.h[0].attn.c_attn.smooth, c.transformer.h[0].attn.c_attn.smooth)

    other = hdrq.quantize(model, _ids(seed=7), cfg, source=model, smooth=smooth_factors(q))
    merged = hdrq.merge([q, other], method="average", verbose=False)
    assert merged.lm_head.weight is merged.transformer.wte.weight
    with pytest.raises(ValueError, match="different SmoothQuant factors"):
        hdrq.merge([q, hdrq.quantize(model, _ids(seed=7), cfg, source=model)], method="average", verbose=False)


def test_unquantizable_layers_names_every_float_layer():
    model = _build("gpt2")
    found = unquantizable_layers(hdrq.calib.prepare_float(model, "cpu"))
    assert set(found) == {"transformer.wte", "transformer.wpe"}
    assert "tied to 'lm_head'" in found["transformer.wte"] and "lookup" in found["transformer.wpe"]


# ------------------------------------------------------------------------------------------------
# Per-token activations and SmoothQuant factors
# ------------------------------------------------------------------------------------------------


def test_per_token_quantizer_is_the_deployed_op():
    torch.manual_seed(0)
    x = torch.randn(3, 5, 17) * torch.linspace(0.1, 9.0, 17)
    x[1, 2] = 0.0  # a row of zeros
    x.requires_grad_(True)
    for bits in (6, 8):
        q = Quantizer(bits, dynamic=True)
        y = q(x)
        ints, s = hdrq.ops.quantize_per_token(x.detach().reshape(-1, 17), bits=bits)
        torch.testing.assert_close(y.detach().reshape(-1, 17), ints.float() * s[:, None], rtol=0, atol=0)
        y.sum().backward()
        assert torch.equal(x.grad, torch.ones_like(x))  # straight through
        x.grad = None
    noisy = Quantizer(6, dynamic=True, mode="noise", seed=3)(x.detach())
    err = (noisy - x.detach()) / (x.detach().abs().amax(-1, keepdim=True) / 31).clamp_min(1e-8)
    assert err.abs().max() <= 0.5 + 1e-5 and err.abs().mean() > 0.1
    with pytest.raises(ValueError, match="dynamic"):
        Quantizer(8, dynamic=True, signed=False)


def test_smooth_scales_formula_and_function_preserved():
    model = _build("llama")
    ids = _ids()
    alpha = 0.5
    got = smooth_scales(model, ids, alpha, batch_size=4, verbose=False)
    lin = model.model.layers[0].mlp.down_proj
    seen = []
    h = lin.register_forward_pre_hook(lambda m, a: seen.append(a[0].detach().reshape(-1, a[0].shape[-1])))
    with torch.no_grad():
        model(ids)
    h.remove()
    amax = torch.cat(seen).abs().amax(0).clamp_min(1e-5)
    want = amax.pow(alpha) / lin.weight.abs().amax(0).clamp_min(1e-5).pow(1 - alpha)
    torch.testing.assert_close(got["model.layers.0.mlp.down_proj"], want)
    # with quantizers off, a smoothed layer computes the float layer's function
    q = QuantLinear(lin, 8, 8, a_enabled=False, smooth=want)
    q.weight_quantizer.set_mode("off")
    x = torch.randn(4, lin.in_features)
    torch.testing.assert_close(q(x), lin(x), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(q.float_module().weight, lin.weight, rtol=1e-6, atol=1e-7)
    with pytest.raises(ValueError, match="finite positive"):
        QuantLinear(lin, 8, 8, smooth=-want)


# ------------------------------------------------------------------------------------------------
# Deploy: torch.compile without graph breaks from hdrq layers, generate
# ------------------------------------------------------------------------------------------------


def test_converted_model_compiles_and_generates():
    model = _build("llama")
    ids = _ids()
    cfg = hdrq.QuantConfig.transformer("rtn", w_bits=8, a_bits=8, calib_batch_size=4, verbose=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        c = hdrq.convert(hdrq.quantize(model, ids, cfg), verbose=False)
    with torch.no_grad():  # inference (with gradients on, a deploy op's backward is defined to raise)
        torch._dynamo.reset()
        explain_float = torch._dynamo.explain(model)(ids)
        torch._dynamo.reset()
        explain = torch._dynamo.explain(c)(ids)
    assert explain.graph_break_count == explain_float.graph_break_count  # none of them from hdrq layers
    torch._dynamo.reset()
    compiled = torch.compile(c, backend="aot_eager", fullgraph=True)
    with torch.no_grad():
        torch.testing.assert_close(compiled(ids).logits, c(ids).logits)
    with torch.no_grad():
        out = c.generate(ids[:2, :4], attention_mask=torch.ones(2, 4, dtype=torch.long), max_new_tokens=4,
                         do_sample=False, pad_token_id=0)
    assert out.shape == (2, 8) and torch.equal(out[:, :4], ids[:2, :4])
