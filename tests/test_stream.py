"""Streamed calibration (hdrq.calib.stream) against the whole-model path, and compact weight storage."""
import copy
import gc
import os
import warnings
import weakref

import pytest
import torch
from torch import nn

import hdrq
from hdrq.calib import QuantConfig, stream
from hdrq.quant import QuantLayer, QuantLinear, expand_weights, float_state_dict, quant_layers
from hdrq.quant.layers import PACKED, pack_integers, unpack_integers

from test_calib import TinyLlama, TinyResNet, check_hard_state


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def quick(method, **kw):
    base = dict(iters=6, act_iters=3, calib_batch_size=16, noise_mode="uniform", verbose=False)
    return QuantConfig.preset(method, **{**base, **kw})


def staged_mlp():
    """An MLP whose stages (Linear + ReLU) are named blocks: they chain."""
    torch.manual_seed(1)
    return nn.Sequential(*[nn.Sequential(nn.Linear(16 if i == 0 else 24, 24), nn.ReLU()) for i in range(3)],
                         nn.Linear(24, 4)).eval()


class SkipAcross(nn.Module):
    """Block 0's output is read again after block 1 (a skip across blocks): not a chain."""

    def __init__(self):
        super().__init__()
        self.a = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 8))
        self.b = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 8))
        self.head = nn.Linear(8, 2)

    def forward(self, x):
        h = self.a(x)
        return self.head(self.b(h) + h)


def _streamed(model, x, cfg, **kw):
    """Calibrate with stream=True, failing on a fallback (its warning)."""
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        return hdrq.quantize(model, x, cfg, **kw)


def assert_same_model(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert sa[k].dtype == sb[k].dtype and torch.equal(sa[k], sb[k]), k
    assert [r["name"] for r in a.hdrq_report] == [r["name"] for r in b.hdrq_report]
    assert [r["loss_last"] for r in a.hdrq_report] == [r["loss_last"] for r in b.hdrq_report]


def import_transformers():
    """``transformers``, or a skip."""
    return pytest.importorskip("transformers")


def _hf_llama():
    transformers = import_transformers()
    torch.manual_seed(2)
    cfg = transformers.LlamaConfig(vocab_size=40, hidden_size=32, intermediate_size=48, num_hidden_layers=3,
                                   num_attention_heads=4, num_key_value_heads=2, use_cache=False)
    lm = transformers.LlamaForCausalLM(cfg).eval()

    class Logits(nn.Module):  # model(x) -> a tensor
        def __init__(self, m):
            super().__init__()
            self.m = m

        def forward(self, ids):
            return self.m(input_ids=ids).logits

    return Logits(lm).eval(), torch.randint(0, 40, (20, 7))


CASES = {
    "resnet": lambda: (TinyResNet().eval(), torch.randn(40, 1, 8, 8), None),
    "tiny-llama": lambda: (TinyLlama().eval(), torch.randint(0, 11, (24, 6)), None),
    "staged-mlp": lambda: (staged_mlp(), torch.randn(40, 16), ["0", "1", "2"]),
    "hf-llama": lambda: (*_hf_llama(), None),
}


@pytest.mark.parametrize("method", ["hdrq", "qdrop", "brecq", "rtn"])
@pytest.mark.parametrize("case", list(CASES))
def test_streamed_equals_whole_model_bit_for_bit(case, method):
    if case in ("staged-mlp", "hf-llama") and method in ("brecq", "rtn"):
        pytest.skip("two methods per model suffice here")
    torch.manual_seed(0)
    model, x, blocks = CASES[case]()
    before = copy.deepcopy(model.state_dict())
    source = model if method == "hdrq" else None
    whole = hdrq.quantize(model, x, quick(method, stream=False), source=source, blocks=blocks)
    streamed = _streamed(model, x, quick(method, stream=True), source=source, blocks=blocks)
    assert_same_model(whole, streamed)
    with torch.no_grad():
        assert torch.equal(whole(x), streamed(x))
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())  # the caller's model untouched
    assert all(torch.equal(model.state_dict()[k], v) for k, v in before.items())


def test_streamed_resnet_keeps_the_output_placement():
    torch.manual_seed(0)
    model, x = TinyResNet().eval(), torch.randn(40, 1, 8, 8)
    cfg = quick("hdrq", stream=True)
    q = _streamed(model, x, cfg, source=model)
    check_hard_state(q, model, cfg)
    q1 = q.layer1
    assert q1[0].block_input_quantizer.mode == "hard" and q1[0].block_output_quantizer.mode == "hard"
    assert not hasattr(q1[1], "block_input_quantizer")  # its input is block 0's quantized output
    # the layers reading block 0's output mirror its quantizer
    assert q1[1].conv1.act_quantizer.scale == q1[0].block_output_quantizer.scale


def _holds_float_weights(block):
    return block is not None and any(type(m) is nn.Linear or (isinstance(m, QuantLayer) and not m.is_compact)
                                     for m in block.modules())


def test_one_block_at_a_time(monkeypatch):
    """At most one chain block holds float weights at any time (the probe's copies, the pipeline's float and
    quantized versions); the finished ones keep packed integers."""
    torch.manual_seed(0)
    model, x, blocks = staged_mlp(), torch.randn(32, 16), ["0", "1", "2"]
    live: list = []
    peak = [0]
    real = stream.prepare_float

    def tracking(module, device):
        out = real(module, device)
        if module is not model and any(module is model.get_submodule(b) for b in blocks):
            live.append(weakref.ref(out))
            gc.collect()
            peak[0] = max(peak[0], sum(_holds_float_weights(r()) for r in live))
        return out

    monkeypatch.setattr(stream, "prepare_float", tracking)
    _streamed(model, x, quick("qdrop", stream=True), blocks=blocks)
    assert len(live) == 2 * len(blocks)  # probe + pipeline
    assert peak[0] == 1


def test_models_that_do_not_chain_fall_back_with_the_reason():
    torch.manual_seed(0)
    model, x = SkipAcross().eval(), torch.randn(32, 8)
    blocks = ["a", "b"]
    whole = hdrq.quantize(model, x, quick("qdrop", stream=False), blocks=blocks)
    with pytest.warns(RuntimeWarning, match="not streaming .*reads a tensor that only chain block"):
        q = hdrq.quantize(model, x, quick("qdrop", stream=True), blocks=blocks)
    assert_same_model(whole, q)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        hdrq.quantize(model, x, quick("qdrop"), blocks=blocks)  # auto: quietly whole
    with pytest.warns(RuntimeWarning, match="fewer than two multi-layer blocks"):
        hdrq.quantize(nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2)), torch.randn(8, 4),
                      quick("rtn", stream=True))


def test_stream_field_is_validated():
    with pytest.raises(ValueError, match="stream must be None, True or False, got 'yes'"):
        QuantConfig(stream="yes")


# ------------------------------------------------------------------------------------------------
# Compact weights
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("bits", [2, 3, 4, 5, 8])
@pytest.mark.parametrize("numel", [1, 7, 64])
def test_pack_integers_round_trip(bits, numel):
    g = torch.Generator().manual_seed(numel * 10 + bits)
    lo, hi = -(1 << (bits - 1)), (1 << (bits - 1)) - 1
    q = torch.randint(lo, hi + 1, (numel,), generator=g, dtype=torch.int32)
    q[0] = lo
    store = 4 if bits <= 4 else 8
    packed = pack_integers(q, store)
    assert packed.dtype == torch.uint8 and packed.numel() == (-(-numel // 2) if store == 4 else numel)
    assert torch.equal(unpack_integers(packed, store, (numel,)), q)


def _hard_layer(bits=4, per_channel=True, seed=0):
    g = torch.Generator().manual_seed(seed)
    layer = QuantLinear(nn.Linear(7, 5), bits, 8, per_channel=per_channel)
    s = torch.rand(5 if per_channel else 1, generator=g) * 0.1 + 0.05
    layer.weight_quantizer.set_scale(s)
    q = torch.randint(-(1 << (bits - 1)), 1 << (bits - 1), (5, 7), generator=g)
    layer.weight.data = (s.reshape(-1, 1) if per_channel else s) * q.float()
    return layer.eval()


@pytest.mark.parametrize("bits,per_channel", [(4, True), (3, False), (8, True), (6, False)])
def test_compact_layer_keeps_the_contract(bits, per_channel):
    layer = _hard_layer(bits, per_channel)
    w, ints = layer.weight.detach().clone(), layer.weight_integers()
    x = torch.randn(3, 7)
    y = layer(x)
    layer.compact()
    assert layer.is_compact and "weight" not in dict(layer.named_parameters())
    sd = layer.state_dict()
    assert sd[PACKED].dtype == torch.uint8 and "weight" not in sd
    assert torch.equal(layer.weight, w) and torch.equal(layer.weight_integers(), ints)
    assert torch.equal(layer(x), y)
    assert float_state_dict(layer)["weight"].equal(w)
    layer.expand()
    assert isinstance(layer.weight, nn.Parameter) and torch.equal(layer.weight, w) and not layer.is_compact


def test_compact_refuses_weights_off_the_grid():
    layer = _hard_layer()
    with torch.no_grad():
        layer.weight.add_(1e-3)
    with pytest.raises(ValueError, match="not step \\* integers"):
        layer.compact()
    layer.weight_quantizer.set_mode("noise")
    with pytest.raises(ValueError, match="hard-quantized state"):
        layer.compact()


def test_compact_models_merge_convert_save_and_barrier_like_expanded_ones(tmp_path):
    torch.manual_seed(0)
    model, x = TinyResNet().eval(), torch.randn(40, 1, 8, 8)
    qa = hdrq.quantize(model, x, quick("qdrop", seed=1))
    qb = hdrq.quantize(model, x, quick("qdrop", seed=2))
    assert all(layer.is_compact for _, layer in quant_layers(qa))
    ea, eb = expand_weights(copy.deepcopy(qa)), expand_weights(copy.deepcopy(qb))
    merged = hdrq.merge([qa, qb], seed=3, candidates=8, verbose=False)
    merged_e = hdrq.merge([ea, eb], seed=3, candidates=8, verbose=False)
    assert all(layer.is_compact for _, layer in quant_layers(merged))
    assert float_state_dict(merged).keys() == merged_e.state_dict().keys()
    for k, v in float_state_dict(merged).items():
        assert torch.equal(v, merged_e.state_dict()[k]), k
    with torch.no_grad():
        assert torch.equal(merged(x), merged_e(x))
        dq, dq_e = hdrq.convert(merged, verbose=False), hdrq.convert(merged_e, verbose=False)
        assert torch.equal(dq(x), dq_e(x))
    hdrq.save(dq, tmp_path / "m.safetensors")
    loaded = hdrq.load(tmp_path / "m.safetensors", model=TinyResNet())
    with torch.no_grad():
        assert torch.equal(loaded(x), dq(x))

    def loss_fn(m, batch):
        return m(batch).pow(2).mean()

    data = [x[:20], x[20:]]
    for quant_noise in (False, True):
        r = hdrq.error_barrier(qa, qb, loss_fn, data, steps=3, quant_noise=quant_noise, verbose=False)
        r_e = hdrq.error_barrier(ea, eb, loss_fn, data, steps=3, quant_noise=quant_noise, verbose=False)
        assert r["losses"] == r_e["losses"]
    assert r["losses"][0] != r["losses"][-1]  # the two ends differ: the interpolation reads both models


@pytest.mark.parametrize("stream", [True, False])
def test_checkpoints_resume_after_the_last_finished_block(stream, tmp_path):
    """A rerun with the same arguments restores the finished blocks and calibrates the rest: the same model.
    (tests/test_pipeline.py kills a real run with SIGKILL.)"""
    import glob

    torch.manual_seed(0)
    model, x = TinyResNet().eval(), torch.randn(24, 1, 8, 8)
    cfg = quick("hdrq", stream=stream)
    full = hdrq.quantize(model, x, cfg, source=model, checkpoint=str(tmp_path))
    files = sorted(glob.glob(str(tmp_path / "block-*.safetensors")))
    assert len(files) == len(full.hdrq_report) == 4
    os.remove(files[-1])
    os.remove(files[-2])
    with open(files[0], "r+b") as f:  # a corrupted checkpoint is reported and its block calibrated again
        f.seek(-4, os.SEEK_END)
        f.write(b"\0\1\2\3")
    with pytest.warns(RuntimeWarning, match="checksum mismatch"):
        resumed = hdrq.quantize(model, x, cfg, source=model, checkpoint=str(tmp_path))
    assert_same_model(full, resumed)
    other = hdrq.quantize(model, x, quick("hdrq", stream=stream, seed=5), source=model)
    with pytest.warns(RuntimeWarning, match="belongs to another run"):  # another config: not reused
        again = hdrq.quantize(model, x, quick("hdrq", stream=stream, seed=5), source=model, checkpoint=str(tmp_path))
    assert_same_model(other, again)
