"""Where activations are quantized: the "output" placement (the authors' and QDrop's convention: layer outputs
after their activation, residual-block outputs after the add, not the network input) against the "input"
placement, through quantize, convert, save/load, merge and the error barrier; the authors' protocol preset."""
import copy

import pytest
import torch
import torch.nn.functional as F

import hdrq
from hdrq.calib import QuantConfig, reconstruct
from hdrq.nn import ActQuant, QConv2d
from hdrq.quant import boundary_quantizers, quant_layers
from test_calib import TinyEncoder, TinyResNet, held_out_loss, make_mlp, make_task, quick


@pytest.fixture(scope="module")
def cnn():
    return make_task(TinyResNet, (1, 8, 8), steps=150, lr=1e-2, n_test=256)


@pytest.fixture(scope="module")
def quantized(cnn):
    """Two QDrop W4A4 models (seeds 0, 1) under the default ("output") placement."""
    return [hdrq.quantize(cnn["model"], cnn["calib"][:64], quick("qdrop", w_bits=4, a_bits=4, seed=s))
            for s in (0, 1)]


def _boundaries(q):
    return {(name, where): bq for name, where, bq in boundary_quantizers(q)}


def test_output_placement_is_the_preset_default():
    for method in ("rtn", "brecq", "qdrop", "hdrq"):
        assert QuantConfig.preset(method).act_placement == "output"
    with pytest.raises(ValueError, match="act_placement must be one of"):
        QuantConfig(act_placement="outputs")


def test_output_placement_structure(quantized):
    q = quantized[0]
    b = _boundaries(q)
    # The first block reads the stem's (unquantized) output: it gets an input quantizer; every block's output
    # is quantized; the last boundary (feeding the head) takes first_last_bits.
    assert set(b) == {("layer1.0", "input"), ("layer1.0", "output"), ("layer1.1", "output")}
    assert [b[k].bits for k in sorted(b)] == [4, 4, 8]
    assert all(not bq.signed for bq in b.values())  # post-ReLU
    layers = dict(quant_layers(q))
    assert layers["conv1"].act_quantizer.mode == "off"  # the network's input is not quantized
    mirrors = {"layer1.0.conv1": b["layer1.0", "input"], "layer1.1.conv1": b["layer1.0", "output"],
               "layer1.1.downsample.0": b["layer1.0", "output"]}
    for name, producer in mirrors.items():
        aq = layers[name].act_quantizer
        assert aq.mode == "hard" and (aq.bits, aq.signed) == (producer.bits, producer.signed), name
        assert torch.equal(aq.scale, producer.step_size()), name
    for name in ("layer1.0.conv2", "layer1.1.conv2", "fc"):  # inside a block, or after the pooling
        assert layers[name].act_quantizer.mode == "hard"
    assert layers["fc"].act_quantizer.bits == 8


def _inputs_of(model, name, x):
    seen = []
    h = model.get_submodule(name).register_forward_pre_hook(lambda m, a: seen.append(a[0].detach()), prepend=True)
    with torch.no_grad():
        model(x)
    h.remove()
    return seen[0]


def test_the_residual_stream_is_quantized(cnn, quantized):
    """What the second block receives (its convolutions and its shortcut alike) is on the first block's output
    grid under "output"; under "input" the stream stays float."""
    x = cnn["x_test"][:16]
    q = quantized[0]
    s = q.layer1[0].block_output_quantizer.step_size().detach()
    v = _inputs_of(q, "layer1.1", x) / s
    assert torch.allclose(v, v.round(), atol=1e-4) and v.min() >= 0 and v.max() <= 15
    q_in = hdrq.quantize(cnn["model"], cnn["calib"][:64], quick("qdrop", w_bits=4, a_bits=4, act_placement="input"))
    assert not list(boundary_quantizers(q_in))
    v = _inputs_of(q_in, "layer1.1", x) / s
    assert not torch.allclose(v, v.round(), atol=1e-2)


def test_block_input_quantizer_is_reconstructed_with_its_block(cnn):
    """The cache holds a block's inputs as the previous block produced them: a block's own input quantizer is
    part of what its reconstruction learns, so it must not have been applied to the cached inputs."""
    from hdrq.calib.cache import BlockCache

    q = hdrq.quantize(cnn["model"], cnn["calib"][:32], quick("rtn", w_bits=4, a_bits=4))
    fp = hdrq.calib.prepare_float(cnn["model"], "cpu")
    cache = BlockCache.build(fp, q, "layer1.0", cnn["calib"][:32], torch.device("cpu"), batch_size=16, iters=1,
                             drop_prob=0.0, seed=0)
    cached = cache.q_leaves[0]
    s = q.layer1[0].block_input_quantizer.step_size().detach()
    assert not torch.allclose(cached / s, (cached / s).round(), atol=1e-2)
    expect = _inputs_of(copy.deepcopy(q), "layer1.0", cnn["calib"][:32])  # the raw argument, before the hook
    assert torch.equal(cached, expect)


def test_convert_save_load_keep_the_rounding_steps(cnn, quantized, tmp_path):
    q = quantized[0]
    d = hdrq.convert(q, verbose=False)
    assert isinstance(d.layer1[0].block_output_quantizer, ActQuant)
    assert d.conv1.act == "float" and d.layer1[1].conv1.act == "static"
    x = cnn["x_test"][:32]
    with torch.no_grad():
        ref, out = q(x), d(x)
        # the integer layers recover the rounding step's integers exactly: same as the fake-quant model up to
        # fp32 summation order
        torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
        assert torch.equal(_inputs_of(d, "layer1.1", x), _inputs_of(q, "layer1.1", x))
    path = tmp_path / "m.safetensors"
    hdrq.save(d, path)
    for skeleton in (TinyResNet(), copy.deepcopy(q), copy.deepcopy(d)):
        loaded = hdrq.load(path, model=skeleton)
        assert isinstance(loaded.layer1[1].block_output_quantizer, ActQuant)
        assert isinstance(loaded.layer1[1].conv1, QConv2d)
        with torch.no_grad():
            assert torch.equal(loaded(x), out)


def test_load_refuses_a_rounding_step_without_its_block(cnn, quantized, tmp_path):
    path = tmp_path / "m.safetensors"
    hdrq.save(hdrq.convert(quantized[0], verbose=False), path)
    other = TinyResNet()
    other.layer1 = torch.nn.Sequential(other.layer1[0])  # no layer1.1
    with pytest.raises(ValueError, match="layer1.1"):
        hdrq.load(path, model=other)


@pytest.mark.parametrize("method", ["average", "hdrq"])
def test_merge_and_barrier_of_output_placement_models(cnn, quantized, method):
    merged = hdrq.merge(quantized, method=method, verbose=False)
    bm = _boundaries(merged)
    for key, bq in bm.items():
        expect = sum(_boundaries(q)[key].step_size().detach().double() for q in quantized) / 2
        torch.testing.assert_close(bq.step_size().detach().double(), expect)
    layers = dict(quant_layers(merged))
    # a layer reading a boundary keeps that boundary's step size after the merge (both are the same mean)
    torch.testing.assert_close(layers["layer1.1.conv1"].act_quantizer.scale, bm["layer1.0", "output"].scale)
    assert held_out_loss(merged, cnn) < 3 * held_out_loss(cnn["model"], cnn)
    data = [(cnn["x_test"][:64], cnn["y_test"][:64])]
    r = hdrq.error_barrier(quantized[0], quantized[1], lambda m, b: F.mse_loss(m(b[0]), b[1]), data, steps=3,
                           verbose=False)
    with torch.no_grad():
        assert r["loss_a"] == pytest.approx(F.mse_loss(quantized[0](data[0][0]), data[0][1]).item(), rel=1e-6)


def test_mlp_and_transformer_under_output_placement():
    """No residual block: nothing but the network input changes. Transformer blocks keep one input quantizer
    per layer (as the authors quantize transformer layers)."""
    mlp = make_mlp().eval()
    q = hdrq.quantize(mlp, torch.randn(32, 16), quick("rtn"))
    acts = {n: l.act_quantizer.mode for n, l in quant_layers(q)}
    assert acts == {"0": "off", "2": "hard", "4": "hard", "6": "hard"}
    assert not list(boundary_quantizers(q))
    enc = TinyEncoder().eval()
    q = hdrq.quantize(enc, torch.randn(16, 5, 6), quick("rtn"))
    assert not list(boundary_quantizers(q))
    acts = {n: l.act_quantizer.mode for n, l in quant_layers(q)}
    assert acts.pop("embed") == "off" and set(acts.values()) == {"hard"}


def test_authors_preset_and_brecq_activation_stage(cnn, monkeypatch):
    cfg = QuantConfig.authors("brecq", iters=2, act_iters=3, verbose=False)
    assert (cfg.calib_batch_size, cfg.granularity, cfg.act_placement, cfg.first_last_bits) == (1, "tensor",
                                                                                               "output", 8)
    assert (cfg.a_lr, cfg.act_loss_p) == (4e-4, 2.4)
    assert QuantConfig.authors("hdrq", calib_batch_size=4).calib_batch_size == 4  # overrides win
    seen = []
    original = reconstruct.reconstruction_loss

    def spy(pred, target, p=2.0):
        seen.append(p)
        return original(pred, target, p)

    monkeypatch.setattr(reconstruct, "reconstruction_loss", spy)
    hdrq.quantize(cnn["model"], cnn["calib"][:8], cfg)
    # weights stage at p = 2, activations at 2.4; the stem has no activation quantizer (it reads the image)
    assert seen == [2.0] * 2 + ([2.0] * 2 + [2.4] * 3) * 3
    d = torch.randn(3, 5)
    assert torch.equal(original(d, torch.zeros(3, 5), 2.4), d.abs().pow(2.4).sum(1).mean())
