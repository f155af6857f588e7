"""hdrq.quantize end to end: every method on tiny models of a learnable synthetic task, the hard-quantized
state it leaves, accuracy against FP and RTN, HDRQ's distance term and noise schedule, reproducibility,
bad inputs, the Triton backend, and (on a GPU) the device paths."""
import copy
import os
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import hdrq
from hdrq.calib import QuantConfig
from hdrq.quant import QuantConv2d, QuantLinear, boundary_quantizers, quant_layers

METHODS = ("rtn", "brecq", "qdrop", "hdrq")
HAS_CUDA = torch.cuda.is_available()


# ------------------------------------------------------------------------------------------------
# Tiny models and a learnable synthetic task: regress a small random teacher's outputs
# ------------------------------------------------------------------------------------------------


class BasicBlock(nn.Module):
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


class TinyResNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 8, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(8)
        self.layer1 = nn.Sequential(BasicBlock(8, 8), BasicBlock(8, 16, 2))
        self.fc = nn.Linear(16, 4)

    def forward(self, x):
        return self.fc(self.layer1(F.relu(self.bn1(self.conv1(x)))).mean((2, 3)))


class TinyEncoder(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Linear(6, 16)
        layer = nn.TransformerEncoderLayer(16, 2, 32, dropout=0.0, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
        self.head = nn.Linear(16, 4)

    def forward(self, x):
        return self.head(self.encoder(self.embed(x)).mean(1))


def make_mlp():
    return nn.Sequential(nn.Linear(16, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(),
                         nn.Linear(64, 4))


def _teacher(shape):
    if len(shape) == 3:  # images
        return nn.Sequential(nn.Conv2d(shape[0], 4, 3, padding=1), nn.Tanh(), nn.AdaptiveAvgPool2d(2), nn.Flatten(),
                             nn.Linear(16, 4))
    if len(shape) == 2:  # token sequences
        return _SeqTeacher(shape[1])
    return nn.Sequential(nn.Linear(shape[0], 8), nn.Tanh(), nn.Linear(8, 4))


class _SeqTeacher(nn.Module):
    """A permutation-invariant function of the tokens (learnable by a mean-pooled encoder)."""

    def __init__(self, d):
        super().__init__()
        self.f, self.g = nn.Linear(d, 8), nn.Linear(8, 4)

    def forward(self, x):
        return self.g(torch.tanh(self.f(x)).mean(1))


def make_task(make_model, shape, *, seed=0, n_train=768, n_test=2048, steps=300, lr=3e-3):
    """A trained model of a regression task (a small random teacher's normalised outputs), with
    ``calib`` inputs from its training split and a held-out split."""
    torch.manual_seed(seed + 1000)
    teacher = _teacher(shape).eval()
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n_train + n_test, *shape, generator=g)
    with torch.no_grad():
        y = teacher(x)
        y = y / y.std()
    torch.manual_seed(seed)
    model = make_model()
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    model.train()
    for _ in range(steps):
        idx = torch.randint(0, n_train, (64,))
        loss = F.mse_loss(model(x[idx]), y[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    return dict(model=model, calib=x[:256], x_test=x[n_train:], y_test=y[n_train:], x_train=x[:n_train],
                y_train=y[:n_train])


def held_out_loss(model, task):
    with torch.no_grad():
        return F.mse_loss(model(task["x_test"]), task["y_test"]).item()


@pytest.fixture(scope="module")
def mlp_task():
    return make_task(make_mlp, (16,), steps=600)


@pytest.fixture(scope="module")
def cnn_task():
    return make_task(TinyResNet, (1, 8, 8), steps=150, lr=1e-2, n_test=512)


@pytest.fixture(scope="module")
def encoder_task():
    return make_task(TinyEncoder, (5, 6), steps=150, lr=3e-3, n_test=512)


def quick(method, **kw):
    """A short schedule for tests (the presets' 20,000 iterations are the published protocol)."""
    base = dict(iters=8, act_iters=4, calib_batch_size=16, noise_mode="uniform", verbose=False)
    return QuantConfig.preset(method, **{**base, **kw})


def check_hard_state(q, model, cfg, reads_input="first"):
    """The quantized-model contract (see the project notes): every layer quantized and exactly on its grid;
    every activation quantizer hard. Under the "output" placement the layer that reads the network's input
    (``reads_input``: by default the first layer, as these test models feed it straight in; None for none)
    does not quantize it."""
    assert not any(type(m) in (nn.Linear, nn.Conv2d) for m in q.modules())
    assert not any(isinstance(m, nn.BatchNorm2d) for m in q.modules())
    layers = dict(quant_layers(q))
    assert layers
    first = next(iter(layers)) if reads_input == "first" else reads_input
    for _, _, bq in boundary_quantizers(q):
        assert cfg.act_placement == "output" and cfg.a_bits is not None
        assert bq.mode == "hard" and bq.drop_prob == 0.0 and not bq.training and bool(bq.scale > 0)
    for name, layer in layers.items():
        if name == first and cfg.act_placement == "output":
            assert layer.act_quantizer.mode == "off"
            layer.act_quantizer.mode = "hard" if cfg.a_bits is not None else "off"  # for the checks below
        else:
            first = None
        wq, aq = layer.weight_quantizer, layer.act_quantizer
        s = wq.step_size().detach()
        s = s.reshape(-1, *[1] * (layer.weight.dim() - 1)) if wq.axis == 0 else s
        ints = layer.weight_integers()
        assert torch.equal(layer.weight.detach(), s * ints.float()), name
        assert ints.min() >= wq.qmin and ints.max() <= wq.qmax, name
        assert wq.mode == "hard" and wq.rounding is None and wq.drop_prob == 0.0, name
        assert wq.axis == (0 if cfg.granularity == "channel" else None)
        assert aq.axis is None and aq.drop_prob == 0.0 and not aq.training
        assert aq.mode == ("off" if cfg.a_bits is None else "hard"), name
        assert bool(torch.all(aq.scale > 0)) and bool(torch.all(wq.scale > 0))
        if first is not None:
            aq.mode = "off"
    assert q.hdrq_config == cfg.to_dict()
    assert not q.training
    return layers


# ------------------------------------------------------------------------------------------------
# Every method, every model
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("task_name", ["mlp_task", "cnn_task", "encoder_task"])
def test_every_method_w8a8_hard_state_and_close_to_fp(request, task_name, method):
    task = request.getfixturevalue(task_name)
    model = task["model"]
    before = copy.deepcopy(model.state_dict())
    cfg = quick(method, w_bits=8, a_bits=8)
    q = hdrq.quantize(model, task["calib"][:64], cfg, source=model if method == "hdrq" else None)
    layers = check_hard_state(q, model, cfg)
    assert all(layer.weight_quantizer.bits == 8 for layer in layers.values())
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())  # input untouched
    fp, ql = held_out_loss(model, task), held_out_loss(q, task)
    assert abs(ql - fp) <= 0.03 * fp, (fp, ql)
    if method == "rtn":
        assert q.hdrq_report == []
    else:
        assert len(q.hdrq_report) >= 3 and all(r["iters"] > 0 for r in q.hdrq_report)


def test_w4a4_grids_first_last_bits_and_signedness(cnn_task):
    cfg = quick("qdrop", w_bits=4, a_bits=4, granularity="channel", act_placement="input")
    q = hdrq.quantize(cnn_task["model"], cnn_task["calib"][:64], cfg)
    layers = check_hard_state(q, cnn_task["model"], cfg)
    bits = {n: (l.weight_quantizer.bits, l.act_quantizer.bits) for n, l in layers.items()}
    assert bits["conv1"] == (8, 8) and bits["fc"] == (8, 8)  # first and last layer: first_last_bits
    assert all(b == (4, 4) for n, b in bits.items() if n not in ("conv1", "fc"))
    signed = {n: l.act_quantizer.signed for n, l in layers.items()}
    assert signed["conv1"]  # the raw input has negative values
    assert not signed["layer1.0.conv1"] and not signed["layer1.0.conv2"] and not signed["fc"]  # after ReLU
    assert isinstance(q.conv1, QuantConv2d) and isinstance(q.fc, QuantLinear)
    assert isinstance(q.bn1, nn.Identity)  # folded
    assert [r["name"] for r in q.hdrq_report] == ["conv1", "layer1.0", "layer1.1", "fc"]
    assert [r["kind"] for r in q.hdrq_report] == ["layer", "residual", "residual", "layer"]


def test_w4a4_reconstruction_beats_rtn(mlp_task):
    """Each reconstruction method ends below round-to-nearest on held-out data. Short schedules need larger
    learning rates than the 20,000-iteration defaults."""
    model, calib = mlp_task["model"], mlp_task["calib"]
    fast = dict(brecq=dict(w_lr=1e-2, a_lr=1e-3), qdrop=dict(w_lr=1e-2, a_lr=1e-3), hdrq=dict(w_lr=1e-3, a_lr=1e-3))
    losses = {}
    for method in METHODS:
        cfg = quick(method, w_bits=4, a_bits=4, iters=100, act_iters=50, calib_batch_size=32, **fast.get(method, {}))
        q = hdrq.quantize(model, calib, cfg, source=model if method == "hdrq" else None)
        check_hard_state(q, model, cfg)
        losses[method] = held_out_loss(q, mlp_task)
    fp = held_out_loss(model, mlp_task)
    assert losses["rtn"] > 1.1 * fp, losses  # W4A4 costs something to recover
    for method in ("brecq", "qdrop", "hdrq"):
        assert losses[method] < losses["rtn"], losses


def _distance(q, source):
    src = dict(quant_layers(q))
    return sum((src[n].weight - m.weight).norm().item() for n, m in source.named_modules() if n in src)


def test_hdrq_distance_term_pulls_towards_source(mlp_task):
    source = mlp_task["model"]
    adapted = copy.deepcopy(source).train()  # adaptation: fine-tune on a shifted input domain
    x, y = mlp_task["x_train"] + 0.7, mlp_task["y_train"]
    opt = torch.optim.Adam(adapted.parameters(), lr=3e-3)
    torch.manual_seed(1)
    for _ in range(60):
        idx = torch.randint(0, x.shape[0], (64,))
        loss = F.mse_loss(adapted(x[idx]), y[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    adapted.eval()
    dist = {}
    for lam in (0.0, 5e-2):
        cfg = quick("hdrq", w_bits=4, a_bits=4, iters=60, lambda_dist=lam, w_lr=1e-3, calib_batch_size=32)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # source is unused (and says so) with lambda_dist=0
            q = hdrq.quantize(adapted, x[:128], cfg, source=source)
        dist[lam] = _distance(q, source)
    assert dist[5e-2] < dist[0.0], dist


# ------------------------------------------------------------------------------------------------
# HDRQ's schedule, reproducibility, data forms, blocks
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("noise_mode", ["uniform", "histogram"])
def test_noise_to_hard_switch_at_the_configured_iteration(mlp_task, noise_mode, monkeypatch):
    model = mlp_task["model"]
    cfg = quick("hdrq", iters=10, noise_fraction=0.6, noise_mode=noise_mode)
    seen = {}

    def record(name):
        def hook(module, args):
            if module.weight_quantizer.training:  # reconstruction calls only (caching passes run in eval)
                seen.setdefault(name, []).append((module.weight_quantizer.mode, module.act_quantizer.mode,
                                                  module.weight_quantizer.noise_mode))
        return hook

    original = hdrq.calib.engine.build_quant_model

    def build_and_hook(*a, **kw):
        qmodel = original(*a, **kw)
        for name, layer in quant_layers(qmodel):
            layer.register_forward_pre_hook(record(name))
        return qmodel

    monkeypatch.setattr(hdrq.calib.engine, "build_quant_model", build_and_hook)
    q = hdrq.quantize(model, mlp_task["calib"][:64], cfg, source=model)
    assert set(seen) == {"0", "2", "4", "6"}
    for name, modes in seen.items():
        act = ("off", "off") if name == "0" else ("noise", "hard")  # "0" reads the network's input
        assert modes == [("noise", act[0], noise_mode)] * 6 + [("hard", act[1], noise_mode)] * 4, name
    check_hard_state(q, model, cfg)


def test_reproducible_for_a_fixed_seed(cnn_task):
    model, calib = cnn_task["model"], cnn_task["calib"][:64]
    runs = [hdrq.quantize(model, calib, quick("hdrq", iters=6, seed=s), source=model).state_dict() for s in (3, 3, 4)]
    assert runs[0].keys() == runs[1].keys()
    assert all(torch.equal(runs[0][k], runs[1][k]) for k in runs[0])
    assert not all(torch.equal(runs[0][k], runs[2][k]) for k in runs[0])


def test_calib_data_forms_give_the_same_model(mlp_task):
    model, x = mlp_task["model"], mlp_task["calib"][:48]
    y = torch.zeros(48)
    cfg = quick("qdrop", iters=4)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=20)
    runs = [hdrq.quantize(model, data, cfg).state_dict() for data in (x, [x[:10], x[10:]], loader)]
    for other in runs[1:]:
        assert all(torch.equal(runs[0][k], other[k]) for k in runs[0])


def test_explicit_blocks(cnn_task):
    cfg = quick("brecq", iters=3, act_iters=2)
    q = hdrq.quantize(cnn_task["model"], cnn_task["calib"][:32], cfg, blocks=["layer1"])
    assert [(r["name"], r["kind"]) for r in q.hdrq_report] == [("conv1", "layer"), ("layer1", "explicit"),
                                                               ("fc", "layer")]
    assert q.hdrq_report[1]["stages"] == ["weights:3", "activations:2"]
    assert q.hdrq_config["blocks"] == ["layer1"]
    with pytest.raises(ValueError, match="not a submodule"):
        hdrq.quantize(cnn_task["model"], cnn_task["calib"][:32], cfg, blocks=["layer9"])


class TinyLlamaAttention(nn.Module):
    def __init__(self, d):
        super().__init__()
        self.q_proj, self.k_proj, self.v_proj, self.o_proj = (nn.Linear(d, d, bias=False) for _ in range(4))

    def forward(self, h, attention_mask):
        scores = self.q_proj(h) @ self.k_proj(h).transpose(-1, -2) / h.shape[-1] ** 0.5 + attention_mask
        return self.o_proj(torch.softmax(scores, -1) @ self.v_proj(h))


class TinyLlamaDecoderLayer(nn.Module):
    """Hugging Face LLaMA-style: keyword arguments (a mask shared by the batch, position ids) and a tuple out."""

    def __init__(self, d):
        super().__init__()
        self.input_layernorm, self.post_attention_layernorm = nn.LayerNorm(d), nn.LayerNorm(d)
        self.self_attn = TinyLlamaAttention(d)
        self.gate_proj, self.up_proj, self.down_proj = nn.Linear(d, 2 * d), nn.Linear(d, 2 * d), nn.Linear(2 * d, d)

    def forward(self, hidden_states, attention_mask=None, position_ids=None):
        assert position_ids is not None and position_ids.shape[0] == 1
        h = hidden_states + self.self_attn(self.input_layernorm(hidden_states), attention_mask)
        g = self.post_attention_layernorm(h)
        return (h + self.down_proj(F.silu(self.gate_proj(g)) * self.up_proj(g)),)


class TinyLlama(nn.Module):
    def __init__(self, vocab=11, d=8):
        super().__init__()
        self.embed_tokens = nn.Embedding(vocab, d)
        self.layers = nn.ModuleList([TinyLlamaDecoderLayer(d), TinyLlamaDecoderLayer(d)])
        self.lm_head = nn.Linear(d, vocab)

    def forward(self, ids):
        t = ids.shape[1]
        mask = torch.full((t, t), float("-inf")).triu(1)[None]  # [1, T, T]: shared by the batch
        pos = torch.arange(t)[None]
        h = self.embed_tokens(ids)
        for layer in self.layers:
            h = layer(h, attention_mask=mask, position_ids=pos)[0]
        return self.lm_head(h)


@pytest.mark.parametrize("method", ["qdrop", "hdrq"])
def test_hf_style_decoder_layers_with_token_ids(method):
    torch.manual_seed(0)
    model = TinyLlama().eval()
    ids = torch.randint(0, 11, (24, 6))
    cfg = quick(method, iters=4)
    q = hdrq.quantize(model, ids, cfg, source=model if method == "hdrq" else None)
    check_hard_state(q, model, cfg, reads_input=None)  # the layers read embeddings, quantized
    assert [(r["name"], r["kind"]) for r in q.hdrq_report] == [("layers.0", "transformer"),
                                                               ("layers.1", "transformer"), ("lm_head", "layer")]
    assert isinstance(q.embed_tokens, nn.Embedding)  # not a Conv2d/Linear: left float
    with torch.no_grad():
        rel = (q(ids) - model(ids)).norm() / model(ids).norm()
    assert rel < 0.5


class AppendCache:
    """A mutable object handed to every block, as transformers' DynamicCache: each call appends its keys."""

    def __init__(self):
        self.keys: dict[int, list] = {}

    def update(self, i, k):
        self.keys.setdefault(i, []).append(k)
        return torch.cat(self.keys[i], 1)


class CachedLayer(nn.Module):
    def __init__(self, d, i):
        super().__init__()
        self.i, self.q, self.k, self.o = i, nn.Linear(d, d), nn.Linear(d, d), nn.Linear(d, d)

    def forward(self, h, cache=None):
        k = self.k(h)
        if cache is not None:
            k = cache.update(self.i, k)  # a reused cache would return this call's keys and every earlier call's
        return h + self.o(torch.softmax(self.q(h) @ k.transpose(-1, -2), -1) @ k)


class CachedModel(nn.Module):
    def __init__(self, d=8):
        super().__init__()
        self.layers = nn.ModuleList([CachedLayer(d, 0), CachedLayer(d, 1)])

    def forward(self, x):
        cache = AppendCache()
        for layer in self.layers:
            x = layer(x, cache=cache)
        return x


@pytest.mark.parametrize("method", ["qdrop", "hdrq"])
def test_stateful_block_arguments_get_a_fresh_copy_per_call(method):
    torch.manual_seed(0)
    model = CachedModel().eval()
    x = torch.randn(16, 5, 8)
    cfg = quick(method, iters=4, calib_batch_size=4)
    q = hdrq.quantize(model, x, cfg, source=model if method == "hdrq" else None, blocks=["layers.0", "layers.1"])
    with torch.no_grad():
        assert (q(x) - model(x)).norm() / model(x).norm() < 0.2


class OwnForwardConv(nn.Conv2d):
    """A conv subclass computing something else than nn.Conv2d (here: its input doubled first)."""

    def forward(self, x):
        return super().forward(2 * x)


def test_layer_subclass_with_own_forward_stays_float_and_is_reported():
    torch.manual_seed(0)
    model = nn.Sequential(OwnForwardConv(3, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 5)).eval()
    with pytest.warns(UserWarning, match=r"'0' \(OwnForwardConv: a subclass of nn.Conv2d with its own forward"):
        q = hdrq.quantize(model, torch.randn(8, 3, 8, 8), quick("rtn"))
    assert type(q[0]) is OwnForwardConv and isinstance(q[3], QuantLinear)
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        assert (q(x) - model(x)).norm() / model(x).norm() < 0.05


def test_verbose_switch_covers_every_pass(capfd, mlp_task):
    model, x = mlp_task["model"], mlp_task["calib"][:32]
    hdrq.quantize(model, x, quick("qdrop", iters=2, verbose=False))
    assert capfd.readouterr().err == ""
    hdrq.quantize(model, x, quick("qdrop", iters=2, verbose=True))
    err = capfd.readouterr().err
    assert "observe" in err and "cache" in err and "qdrop [1/" in err


# ------------------------------------------------------------------------------------------------
# Bad input
# ------------------------------------------------------------------------------------------------


def test_bad_inputs_raise_clear_errors(mlp_task):
    model, x = mlp_task["model"], mlp_task["calib"][:16]
    with pytest.raises(ValueError, match="no quantizable layers"):
        hdrq.quantize(nn.Sequential(nn.ReLU(), nn.LayerNorm(16)), x, quick("rtn"))
    with pytest.raises(ValueError, match="empty"):
        hdrq.quantize(model, torch.empty(0, 16), quick("rtn"))
    with pytest.raises(ValueError, match="empty"):
        hdrq.quantize(model, [], quick("rtn"))
    with pytest.raises(ValueError, match="w_bits must be an int from 2 to 8, got 9"):
        hdrq.quantize(model, x, quick("rtn", w_bits=9))
    with pytest.raises(ValueError, match="a_bits must be an int from 2 to 8, got 1"):
        hdrq.quantize(model, x, quick("rtn", a_bits=1))
    with pytest.raises(ValueError, match="needs source="):
        hdrq.quantize(model, x, quick("hdrq"))
    other = make_mlp()
    other[2] = nn.Linear(64, 32)
    other[4] = nn.Linear(32, 64)
    with pytest.raises(ValueError, match=r"source does not match.*2: \(64, 64\) vs \(32, 64\)"):
        hdrq.quantize(model, x, quick("hdrq"), source=other)
    renamed = nn.Sequential(*list(make_mlp().children()), nn.Identity())
    renamed.add_module("extra", nn.Linear(4, 4))
    with pytest.raises(ValueError, match=r"layers only in source \['extra'\]"):
        hdrq.quantize(model, x, quick("hdrq"), source=renamed)
    with pytest.raises(TypeError, match="must be a hdrq.QuantConfig"):
        hdrq.quantize(model, x, {"method": "rtn"})
    with pytest.warns(RuntimeWarning, match="source is used only by method 'hdrq'"):
        hdrq.quantize(model, x, quick("rtn"), source=model)


def test_public_names():
    assert hdrq.QuantConfig is QuantConfig
    assert hdrq.quantize is hdrq.calib.quantize


# ------------------------------------------------------------------------------------------------
# Backends
# ------------------------------------------------------------------------------------------------


# The ops each method's reconstruction must run (on top of the observers' fake_quant).
TRITON_OPS = {
    "rtn": {"fake_quant"},
    "brecq": {"fake_quant", "fake_quant_backward"},
    "qdrop": {"fake_quant", "qdrop_fake_quant", "qdrop_fake_quant_backward"},
    "hdrq": {"fake_quant", "fake_quant_backward", "noise_fake_quant", "noise_fake_quant_backward",
             "qdrop_fake_quant", "qdrop_fake_quant_backward"},
}


@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1",
                    reason="the Triton backend runs on CPU tensors only under TRITON_INTERPRET=1")
@pytest.mark.parametrize("method", METHODS)
def test_every_method_on_the_triton_backend(method, monkeypatch):
    """Same seeds on the reference and the Triton backend: the kernels draw the same Philox noise and drop
    masks, so both runs end at (nearly) the same model. Every op the method needs that the Triton backend
    implements must have run on it."""
    torch.manual_seed(0)
    # Two layers: the interpreter runs each program instance in Python, so every launch counts.
    model = nn.Sequential(nn.Linear(6, 12), nn.ReLU(), nn.Linear(12, 3)).eval()
    x = torch.randn(8, 6)
    extra = dict(noise_fraction=0.5) if method == "hdrq" else {}  # one noise and one hard iteration
    cfg = quick(method, iters=2, act_iters=1, calib_batch_size=4, noise_mode="histogram", **extra)
    source = model if method == "hdrq" else None
    hdrq.set_backend("reference")
    ref = hdrq.quantize(model, x, cfg, source=source)

    from hdrq.kernels import quantizer as kq

    calls = {}

    def counting(op, fn):
        def wrapped(*args):
            calls[op] = calls.get(op, 0) + 1
            return fn(*args)
        return wrapped

    for op in TRITON_OPS["hdrq"]:  # the wrappers set_backend("triton") registers, counted
        monkeypatch.setattr(kq, op, counting(op, getattr(kq, op)))
    hdrq.set_backend("triton")
    tri = hdrq.quantize(model, x, cfg, source=source)
    check_hard_state(tri, model, cfg)
    assert TRITON_OPS[method] <= set(calls), (TRITON_OPS[method], calls)
    with torch.no_grad():
        y_ref, y_tri = ref(x), tri(x)
    assert (y_tri - y_ref).norm() <= 0.05 * y_ref.norm()


@pytest.mark.cuda
@pytest.mark.parametrize("method", METHODS)
def test_gpu_every_method_auto_backend_vs_reference(cnn_task, method):
    model = cnn_task["model"]
    cfg = quick(method, w_bits=4, a_bits=4, iters=40, act_iters=20, device="cuda", noise_mode="histogram")
    source = model if method == "hdrq" else None
    runs = {}
    for backend in ("reference", "auto"):
        hdrq.set_backend(backend)
        q = hdrq.quantize(model, cnn_task["calib"].cuda(), cfg, source=source)
        check_hard_state(q, model, cfg)
        assert all(p.is_cuda for p in q.parameters())
        runs[backend] = held_out_loss(q.cpu(), cnn_task)
    assert runs["auto"] <= 1.1 * runs["reference"] + 1e-4, runs


@pytest.mark.cuda
def test_gpu_cache_on_cpu_is_streamed_and_equivalent(mlp_task):
    """Caches kept on the CPU (streamed per batch through pinned memory) train the same model as caches on
    the device: same batches, same drop masks (drawn on the device either way)."""
    model, calib = mlp_task["model"], mlp_task["calib"].cuda()
    on_device = hdrq.quantize(model, calib, quick("qdrop", iters=20, device="cuda"))
    streamed = hdrq.quantize(model, calib, quick("qdrop", iters=20, device="cuda", cache_device="cpu"))
    assert all(r["cache_device"].startswith("cuda") for r in on_device.hdrq_report)
    assert all(r["cache_device"] == "cpu" for r in streamed.hdrq_report)
    a, b = dict(quant_layers(on_device)), dict(quant_layers(streamed))
    same = sum(int((a[n].weight_integers() == b[n].weight_integers()).sum()) for n in a)
    assert same >= 0.999 * sum(l.weight.numel() for l in a.values())
    x = mlp_task["x_test"].cuda()
    with torch.no_grad():
        torch.testing.assert_close(streamed(x), on_device(x), rtol=1e-2, atol=1e-3)
