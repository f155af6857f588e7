"""The parts of the calibration engine: QuantConfig, block detection, the block cache, calibration data,
AdaRound, the decomposed attention."""
import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import hdrq
from hdrq.calib import (PRESETS, BlockCache, QuantConfig, collect_calib_data, find_blocks, is_residual_block,
                        is_transformer_block, prepare_float)
from hdrq.calib.cache import capture
from hdrq.quant.adaround import AdaRound
from hdrq.quant.attention import DecomposedMultiheadAttention, decompose_attention


# ------------------------------------------------------------------------------------------------
# QuantConfig
# ------------------------------------------------------------------------------------------------


def test_presets_carry_published_defaults():
    h = QuantConfig.preset("hdrq")
    assert (h.iters, h.w_lr, h.a_lr, h.drop_prob, h.noise_fraction, h.lambda_dist) == (20000, 1e-4, 4e-5, 0.5, 0.8, 5e-2)
    assert (h.granularity, h.first_last_bits, h.noise_mode, h.warmup, h.observer_p) == ("tensor", 8, "histogram", 0.2, 2.4)
    q = QuantConfig.preset("qdrop")
    assert (q.iters, q.w_lr, q.a_lr, q.drop_prob, q.lambda_dist, q.round_reg_weight, q.round_beta) == \
        (20000, 1e-3, 4e-5, 0.5, 0.0, 0.01, (20.0, 2.0))
    b = QuantConfig.preset("brecq")
    assert (b.iters, b.act_iters, b.drop_prob) == (20000, 5000, 0.0)
    assert QuantConfig.preset("rtn").iters == 0
    assert QuantConfig() == QuantConfig.preset("hdrq")  # HDRQ is the default method
    assert QuantConfig(method="qdrop") == QuantConfig.preset("qdrop")
    assert set(PRESETS) == {"rtn", "brecq", "qdrop", "hdrq"}


def test_fields_override_presets_and_round_trip():
    c = QuantConfig.preset("hdrq", w_bits=3, a_bits=None, iters=7, w_lr=1e-3, noise_mode="uniform",
                           granularity="channel", blocks=("a", "b"))
    assert (c.w_bits, c.a_bits, c.iters, c.w_lr, c.noise_mode, c.blocks) == (3, None, 7, 1e-3, "uniform", ["a", "b"])
    assert c.a_lr == 4e-5  # untouched fields keep the preset
    d = c.to_dict()
    assert d["version"] == 1 and d["method"] == "hdrq"
    assert QuantConfig(**d) == c


@pytest.mark.parametrize("kw, field", [
    (dict(w_bits=1), "w_bits"), (dict(w_bits=9), "w_bits"), (dict(a_bits=16), "a_bits"), (dict(w_bits=4.0), "w_bits"),
    (dict(first_last_bits=1), "first_last_bits"), (dict(method="adaquant"), "method"),
    (dict(granularity="group"), "granularity"), (dict(noise_mode="gauss"), "noise_mode"), (dict(iters=-1), "iters"),
    (dict(calib_batch_size=0), "calib_batch_size"), (dict(noise_fraction=1.5), "noise_fraction"),
    (dict(drop_prob=-0.1), "drop_prob"), (dict(w_lr=-1.0), "w_lr"), (dict(version=2), "version"),
    (dict(method="qdrop", noise_fraction=0.5), "noise_fraction"), (dict(method="brecq", lambda_dist=0.1), "lambda_dist"),
    (dict(round_beta=(20.0,)), "round_beta"), (dict(blocks=[""]), "blocks"),
])
def test_config_validation_names_the_field(kw, field):
    with pytest.raises(ValueError, match=field):
        QuantConfig(**kw)


# ------------------------------------------------------------------------------------------------
# Block detection
# ------------------------------------------------------------------------------------------------


class BasicBlock(nn.Module):  # torchvision's shape: out += identity, identity maybe a projection
    def __init__(self, cin, cout, stride=1):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.downsample = None
        if stride != 1 or cin != cout:
            self.downsample = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
        identity = x if self.downsample is None else self.downsample(x)
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        out += identity
        return F.relu(out)


class PreNormResidual(nn.Module):  # x + f(norm(x)), written with torch.add
    def __init__(self, d):
        super().__init__()
        self.norm = nn.LayerNorm(d)
        self.fc = nn.Linear(d, d)

    def forward(self, x):
        return torch.add(x, self.fc(self.norm(x)))


class TwoBranch(nn.Module):  # adds two tensors that do not both come from the input: not residual
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 4)
        self.bias = nn.Parameter(torch.zeros(4))

    def forward(self, x):
        return self.fc(x) + self.bias


class Untraceable(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 4)

    def forward(self, x):
        if x.sum() > 0:  # data-dependent control flow: FX cannot trace it
            return x + self.fc(x)
        return x


class TinyAttention(nn.Module):  # Hugging Face style: projections are nn.Linear
    def __init__(self, d):
        super().__init__()
        self.q_proj, self.k_proj, self.v_proj, self.o_proj = (nn.Linear(d, d, bias=False) for _ in range(4))

    def forward(self, h):
        a = torch.softmax(self.q_proj(h) @ self.k_proj(h).transpose(-1, -2), -1)
        return self.o_proj(a @ self.v_proj(h))


class TinyDecoderLayer(nn.Module):
    def __init__(self, d):
        super().__init__()
        self.self_attn = TinyAttention(d)
        self.mlp = nn.Linear(d, d)

    def forward(self, h):
        h = h + self.self_attn(h)
        return (h + self.mlp(h),)


def test_block_detection_cnn_transformer_and_singles():
    cnn = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(),
                        nn.Sequential(BasicBlock(8, 8), BasicBlock(8, 16, 2)), nn.Flatten(), nn.LazyLinear(3))
    cnn(torch.randn(1, 1, 6, 6))
    blocks = find_blocks(prepare_float(cnn, "cpu"))
    assert [(b.name, b.kind) for b in blocks] == [("0", "layer"), ("2.0", "residual"), ("2.1", "residual"),
                                                  ("4", "layer")]
    assert blocks[2].layers == ("2.1.conv1", "2.1.conv2", "2.1.downsample.0")
    enc = nn.Sequential(nn.Linear(3, 8), nn.TransformerEncoder(
        nn.TransformerEncoderLayer(8, 2, 16, dropout=0.0, batch_first=True), 2, enable_nested_tensor=False))
    blocks = find_blocks(prepare_float(enc, "cpu"))
    assert [(b.name, b.kind) for b in blocks] == [("0", "layer"), ("1.layers.0", "transformer"),
                                                  ("1.layers.1", "transformer")]
    assert set(blocks[1].layers) == {f"1.layers.0.{n}" for n in ("self_attn.q_proj", "self_attn.k_proj",
                                                                  "self_attn.v_proj", "self_attn.out_proj",
                                                                  "linear1", "linear2")}
    hf = nn.Sequential(TinyDecoderLayer(4), TinyDecoderLayer(4))
    assert [b.kind for b in find_blocks(hf)] == ["transformer", "transformer"]
    assert is_transformer_block(TinyDecoderLayer(4)) and not is_transformer_block(TinyAttention(4))
    assert is_residual_block(PreNormResidual(4)) and is_residual_block(BasicBlock(4, 4))
    assert not is_residual_block(TwoBranch()) and not is_residual_block(Untraceable())
    assert not is_residual_block(nn.Sequential(BasicBlock(4, 4)))  # its own forward adds nothing
    mixed = nn.Sequential(Untraceable(), PreNormResidual(4), TwoBranch())
    assert [(b.name, b.kind) for b in find_blocks(mixed)] == [("0.fc", "layer"), ("1", "residual"),
                                                              ("2.fc", "layer")]


def test_explicit_blocks_validated():
    m = nn.Sequential(nn.Linear(4, 4), nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 4)), nn.ReLU())
    blocks = find_blocks(m, ["1"])
    assert [(b.name, b.kind, b.layers) for b in blocks] == [("0", "layer", ("0",)), ("1", "explicit", ("1.0", "1.2"))]
    with pytest.raises(ValueError, match="not a submodule"):
        find_blocks(m, ["3"])
    with pytest.raises(ValueError, match="contains no"):
        find_blocks(m, ["2"])
    with pytest.raises(ValueError, match="overlap"):
        find_blocks(m, ["1", "1.0"])


# ------------------------------------------------------------------------------------------------
# Calibration data and the block cache
# ------------------------------------------------------------------------------------------------


def test_collect_calib_data_forms():
    x = torch.randn(10, 3, dtype=torch.float64)
    assert torch.equal(collect_calib_data(x), x.float())
    assert torch.equal(collect_calib_data([x[:4], x[4:]]), x.float())
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, torch.arange(10)), batch_size=3)
    assert torch.equal(collect_calib_data(loader), x.float())
    ids = torch.randint(0, 9, (4, 5))
    assert collect_calib_data(ids).dtype == torch.int64  # token ids keep their dtype
    with pytest.raises(ValueError, match="empty"):
        collect_calib_data([])
    with pytest.raises(ValueError, match="empty"):
        collect_calib_data(torch.empty(0, 3))
    with pytest.raises(ValueError, match=r"sample shapes \[\(3,\), \(4,\)\]"):
        collect_calib_data([torch.randn(2, 3), torch.randn(2, 4)])
    with pytest.raises(TypeError, match="got str"):
        collect_calib_data(["abc"])
    with pytest.raises(TypeError, match="got int"):
        collect_calib_data(3)


class KwargBlock(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 4)

    def forward(self, h, mask=None, scale=1.0):
        return (self.fc(h) * scale + mask, None)


class KwargModel(nn.Module):
    def __init__(self):
        super().__init__()
        self.pre = nn.Linear(4, 4)
        self.block = KwargBlock()
        self.post = nn.Linear(4, 2)

    def forward(self, x):
        mask = torch.full((1, 4), 0.5)  # the same for every sample: a constant argument
        h = self.block(self.pre(x), mask=mask, scale=2.0)[0]
        return self.post(h)


def test_capture_batched_and_constant_arguments_and_early_stop():
    torch.manual_seed(0)
    m = KwargModel().eval()
    x = torch.randn(7, 4)
    calls = []
    m.post.register_forward_hook(lambda *a: calls.append(1))
    inputs, outputs = capture(m, m.block, x, 3, torch.device("cpu"), outputs=True, name="block")
    assert not calls  # the forward stopped at the block
    assert inputs.batched == [True, False, False]  # h is batched; mask and scale are constants
    h = m.pre(x).detach()
    torch.testing.assert_close(inputs.leaves[0], h)
    assert torch.equal(inputs.leaves[1], torch.full((1, 4), 0.5)) and inputs.leaves[2] == 2.0
    torch.testing.assert_close(outputs.leaves[0], (m.block.fc(h) * 2 + 0.5).detach())
    assert outputs.batched == [True, False]  # the output's None is a constant leaf
    with pytest.raises(RuntimeError, match="was not called"):
        capture(m, nn.Linear(1, 1), x, 3, torch.device("cpu"), outputs=False, name="stray")


def test_block_cache_batches_and_qdrop_mixing():
    torch.manual_seed(0)
    fp, q = KwargModel().eval(), KwargModel().eval()  # different weights: different block inputs
    q.block = fp.block
    x = torch.randn(64, 4)
    cache = BlockCache.build(fp, q, "block", x, torch.device("cpu"), batch_size=16, iters=5, drop_prob=0.5, seed=3)
    assert cache.n == 64 and cache.idx_cpu.shape == (5, 16)
    assert all(len(set(r.tolist())) == 16 for r in cache.idx_cpu)  # no repeats within a batch
    fp_h, q_h = fp.pre(x).detach(), q.pre(x).detach()
    (h,), kwargs, target = cache.batch(2)
    idx = cache.idx_cpu[2]
    from_fp, from_q = h == fp_h[idx], h == q_h[idx]
    assert bool((from_fp | from_q).all())
    assert 0.2 < from_fp.float().mean() < 0.8  # about drop_prob of the elements are full precision
    assert kwargs["scale"] == 2.0 and torch.equal(kwargs["mask"], torch.full((1, 4), 0.5))
    torch.testing.assert_close(target, fp.block(fp_h[idx], mask=kwargs["mask"], scale=2.0)[0].detach())
    cache.drop_prob = 0.0  # BRECQ: the quantized model's input only
    (h,), _, _ = cache.batch(3)
    torch.testing.assert_close(h, q_h[cache.idx_cpu[3]])
    same = BlockCache.build(fp, q, "block", x, torch.device("cpu"), batch_size=16, iters=5, drop_prob=0.5, seed=3)
    assert torch.equal(same.idx_cpu, cache.idx_cpu)  # seeded
    first = BlockCache.build(fp, fp, "pre", x, torch.device("cpu"), batch_size=16, iters=1, drop_prob=0.5, seed=3)
    assert first.fp_leaves == [None]  # identical inputs are stored once and never mixed
    assert first.nbytes() == 2 * 64 * 4 * 4


# ------------------------------------------------------------------------------------------------
# AdaRound
# ------------------------------------------------------------------------------------------------


def test_adaround_starts_at_the_float_weight_and_hardens():
    torch.manual_seed(0)
    w = torch.randn(6, 5)
    w[0, 0] = 3.0  # outside the grid's range
    s = torch.full((6, 1), 0.3)
    ar = AdaRound(w, s, -8, 7)
    v = w / s
    rest = v - torch.floor(v)
    torch.testing.assert_close(ar.soft(), rest, atol=1e-5, rtol=0)  # h(alpha) is the fractional part
    inside = (w >= -8 * s) & (w <= 7 * s)
    assert 0 < int((~inside).sum()) < 30
    # so the soft weight is the float weight, clamped to the grid's range
    torch.testing.assert_close(ar(w, s), torch.where(inside, w, torch.clamp(w, -8 * s, 7 * s)), atol=1e-5, rtol=0)
    nearest = torch.clamp(torch.round(v), -8, 7)
    away_from_ties = (rest - 0.5).abs() > 1e-4
    assert torch.equal(ar.integers(w, s)[away_from_ties], nearest[away_from_ties])  # init = round to nearest
    ar.alpha.data = torch.where(torch.rand_like(w) < 0.5, -10.0, 10.0)  # h saturated at 0 or 1
    assert torch.equal(ar.soft(), (ar.alpha > 0).float())
    assert ar.regularizer(2.0).item() == 0.0
    assert torch.equal(ar(w, s), torch.clamp(torch.floor(v) + (ar.alpha > 0).float(), -8, 7) * s)
    ar.alpha.data.zero_()  # h = 0.5: the regulariser is at its maximum, 1 per element
    assert ar.regularizer(2.0).item() == pytest.approx(30.0)
    out = ar(w, s).sum()
    out.backward()
    assert ar.alpha.grad is not None and ar.alpha.grad.abs().sum() > 0


def test_adaround_as_quantizer_hook():
    q = hdrq.quant.Quantizer(4, axis=0, channels=3)
    q.set_scale(torch.tensor([0.1, 0.2, 0.3]))
    w = torch.randn(3, 4)
    q.rounding = AdaRound(w, q.step_size().detach().reshape(3, 1), q.qmin, q.qmax)
    torch.testing.assert_close(q(w), q.rounding(w, q.step_size().reshape(3, 1)))
    assert "rounding.alpha" in dict(q.named_parameters())


# ------------------------------------------------------------------------------------------------
# Decomposed attention
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("batch_first", [True, False])
@pytest.mark.parametrize("kdim", [None, 5])
@pytest.mark.parametrize("bias", [True, False])
def test_decomposed_attention_matches_multihead_attention(batch_first, kdim, bias):
    torch.manual_seed(0)
    mha = nn.MultiheadAttention(12, 3, batch_first=batch_first, kdim=kdim, vdim=kdim, bias=bias).eval()
    dec = DecomposedMultiheadAttention.from_float(mha).eval()
    b, tgt, src = 2, 3, 4
    q = torch.randn(b, tgt, 12) if batch_first else torch.randn(tgt, b, 12)
    k = torch.randn(b, src, kdim or 12) if batch_first else torch.randn(src, b, kdim or 12)
    kpm = torch.tensor([[False, False, True, False], [False, False, False, False]])
    for kw in [{}, dict(key_padding_mask=kpm), dict(attn_mask=torch.randn(tgt, src)),
               dict(attn_mask=torch.randn(b * 3, tgt, src), key_padding_mask=kpm.float() * -1e4),
               dict(need_weights=False, attn_mask=torch.rand(tgt, src) < 0.3), dict(average_attn_weights=False)]:
        ref, ref_w = mha(q, k, k, **kw)
        out, out_w = dec(q, k, k, **kw)
        torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
        if ref_w is None:
            assert out_w is None
        else:
            torch.testing.assert_close(out_w, ref_w, rtol=1e-5, atol=1e-5)


@pytest.mark.filterwarnings("ignore:The PyTorch API of nested tensors")
def test_decomposed_attention_unbatched_and_in_encoder():
    torch.manual_seed(0)
    mha = nn.MultiheadAttention(8, 2).eval()
    x = torch.randn(5, 8)
    for a, b in zip(mha(x, x, x), DecomposedMultiheadAttention.from_float(mha)(x, x, x)):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    enc = nn.TransformerEncoder(nn.TransformerEncoderLayer(16, 2, 32, dropout=0.0, batch_first=True), 2).eval()
    dec = decompose_attention(copy.deepcopy(enc))
    assert not any(isinstance(m, nn.MultiheadAttention) for m in dec.modules())
    x = torch.randn(3, 5, 16)
    causal = nn.Transformer.generate_square_subsequent_mask(5)
    kpm = torch.zeros(3, 5, dtype=torch.bool)
    kpm[0, -1] = True
    with torch.no_grad():
        torch.testing.assert_close(dec(x, mask=causal, is_causal=True), enc(x, mask=causal, is_causal=True),
                                   rtol=1e-5, atol=1e-5)
        # the fused nested-tensor path zeroes padded positions; compare the others
        torch.testing.assert_close(dec(x, src_key_padding_mask=kpm)[~kpm], enc(x, src_key_padding_mask=kpm)[~kpm],
                                   rtol=1e-5, atol=1e-5)
    calls = []
    dec.layers[0].self_attn.q_proj.register_forward_hook(lambda *a: calls.append(1))
    with torch.no_grad():
        dec(x)
    assert calls  # the projections run as modules (no fused fast path around them)
    with pytest.raises(NotImplementedError, match="add_bias_kv"):
        DecomposedMultiheadAttention.from_float(nn.MultiheadAttention(4, 2, add_bias_kv=True))
