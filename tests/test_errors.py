"""Bad inputs get clear errors (or a warning that names what was left out), never a silent wrong result: merging
converted models, the models argument of merge, files and folders, devices, endless and malformed calibration
data, and layers hdrq cannot quantize. The property tests (test_properties.py) sweep the same checks at random."""
import itertools
import os
import warnings

import pytest
import torch
from torch import nn

import hdrq
from hdrq.calib import collect_calib_data, unquantizable_layers
from hdrq.calib.config import MAX_CALIB_SAMPLES
from hdrq.nn import QConv2d, QLinear, qlayers
from hdrq.quant import quant_layers

RTN = dict(method="rtn", verbose=False)


def mlp(depth: int = 2, width: int = 16, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    layers = []
    for _ in range(depth):
        layers += [nn.Linear(width, width), nn.ReLU()]
    return nn.Sequential(*layers[:-1])


def cnn(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, stride=2), nn.ReLU(),
                         nn.Flatten(), nn.Linear(8 * 3 * 3, 5))


@pytest.fixture(scope="module")
def quantized():
    """Two adapted copies of a conv net (the same source, perturbed), quantized W6A6 by RTN."""
    x = torch.randn(16, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    base = cnn(0)
    models = []
    for seed in (1, 2):
        m = cnn(0)
        with torch.no_grad():
            for p, q in zip(m.parameters(), base.parameters()):
                p.copy_(q + 0.05 * torch.randn(q.shape, generator=torch.Generator().manual_seed(seed)))
        models.append(hdrq.quantize(m, x, hdrq.QuantConfig(w_bits=6, a_bits=6, **RTN)))
    return models, x


# ------------------------------------------------------------------------------------------------ merge


@pytest.mark.parametrize("method", ["average", "hdrq"])
def test_merge_then_convert_is_exact(quantized, method):
    """The supported order: merge the fake-quant models, then convert. The integer layers hold the merged
    integers, step sizes, biases and input step sizes exactly, and compute what the merged model computes."""
    models, x = quantized
    merged = hdrq.merge(models, method=method, candidates=8, verbose=False)
    deployed = hdrq.convert(merged, verbose=False)
    fq = dict(quant_layers(merged))
    q = dict(qlayers(deployed))
    assert set(q) == set(fq) == {"0", "2", "5"}
    for name, layer in fq.items():
        assert torch.equal(q[name].integer_weight().to(torch.int32), layer.weight_integers().to(torch.int32)), name
        step = layer.weight_quantizer.step_size().detach().float().reshape(-1)
        assert torch.equal(q[name].weight_scale, step.expand(q[name].weight_scale.shape)), name
        assert torch.equal(q[name].bias, layer.bias.detach().float()), name
        if q[name].act_scale is not None:
            assert torch.equal(q[name].act_scale, layer.act_quantizer.step_size().detach().float().reshape(1)), name
    with torch.no_grad():
        torch.testing.assert_close(deployed(x), merged(x), rtol=1e-4, atol=1e-4)


def test_merging_converted_models_is_refused(quantized):
    models, x = quantized
    converted = [hdrq.convert(m, verbose=False) for m in models]
    for pair, bad in [(converted, 0), ([models[0], converted[1]], 1)]:
        with pytest.raises(ValueError, match=rf"model {bad} is already converted .*layer '0' is a hdrq.nn.QConv2d.*"
                                             r"merge first, then convert: hdrq.convert\(hdrq.merge\(models\)\)"):
            hdrq.merge(pair, verbose=False)
    with pytest.raises(ValueError, match=r"error_barrier: model 0 is already converted.*before hdrq.convert"):
        hdrq.error_barrier(*converted, lambda m, b: m(b).mean(), [x], verbose=False)


def test_merge_names_what_it_received(quantized):
    (a, b), _ = quantized
    with pytest.raises(ValueError, match=r"merge: need at least 2 models, got 0"):
        hdrq.merge([], verbose=False)
    with pytest.raises(TypeError, match=r"merge takes a list of models, got a single Sequential: "
                                        r"hdrq.merge\(\[model_a, model_b, ...\]\)"):
        hdrq.merge(a, verbose=False)
    with pytest.raises(TypeError, match=r"got dict: pass list\(models.values\(\)\)"):
        hdrq.merge({"a": a, "b": b}, verbose=False)
    for bad in (None, 3, "ab"):
        with pytest.raises(TypeError, match=rf"merge takes a list of models \(nn.Module\), got {type(bad).__name__}"):
            hdrq.merge(bad, verbose=False)
    with pytest.raises(ValueError, match="seed must be >= 0, got -1"):
        hdrq.merge([a, b], seed=-1, verbose=False)
    with pytest.raises(TypeError, match="weights must be a list of numbers"):
        hdrq.merge([a, b], weights="ab", verbose=False)
    merged = hdrq.merge((m for m in (a, b)), method="average", verbose=False)  # any iterable of models
    assert isinstance(merged, nn.Sequential)


def test_merge_blames_the_architecture():
    x = torch.randn(8, 16)
    q3, q2 = (hdrq.quantize(mlp(depth), x, hdrq.QuantConfig(**RTN)) for depth in (3, 2))
    for models, counts in [([q3, q2], "model 1 has 8 modules, model 0 12"),
                           ([q2, q3], "model 1 has 12 modules, model 0 8")]:
        with pytest.raises(ValueError) as e:
            hdrq.merge(models, verbose=False)
        msg = str(e.value)
        assert "a different architecture: module '3' is in only one of them (a ReLU, and 3 more" in msg
        assert counts in msg and "bits" not in msg
    with pytest.raises(ValueError, match=r"the source is not the models' architecture: .*\['4.bias', '4.weight'\]"):
        hdrq.merge([mlp(2, seed=1), mlp(2, seed=2)], method="ties", source=mlp(3), verbose=False)
    with pytest.raises(ValueError, match=r"model 0 has tensors on the meta device"):
        hdrq.merge([mlp().to("meta"), mlp().to("meta")], verbose=False)


# ------------------------------------------------------------------------------------------------ files


def test_load_and_save_name_the_path(quantized, tmp_path):
    (a, _), x = quantized
    deployed = hdrq.convert(a, verbose=False)
    good = tmp_path / "model.safetensors"
    hdrq.save(deployed, good)
    with pytest.raises(IsADirectoryError, match=rf"hdrq.load: {tmp_path} is a directory; .*\['model.safetensors'\]"):
        hdrq.load(tmp_path)
    with pytest.raises(FileNotFoundError, match=r"hdrq.load: no such file: .*missing.safetensors"):
        hdrq.load(tmp_path / "missing.safetensors")
    for name, content in [("notes.txt", b"not a model\n"), ("empty", b""), ("half", good.read_bytes()[:100])]:
        (tmp_path / name).write_bytes(content)
        with pytest.raises(ValueError, match=rf"{name} is not a readable safetensors file"):
            hdrq.load(tmp_path / name)
    for bad in (None, 3):
        with pytest.raises(TypeError, match=rf"hdrq.load: path must be a str or os.PathLike, got {type(bad).__name__}"):
            hdrq.load(bad)
    with pytest.raises(IsADirectoryError, match=r"hdrq.save: .* is a directory"):
        hdrq.save(deployed, tmp_path)
    with pytest.raises(FileNotFoundError, match=r"hdrq.save: the folder .*nowhere does not exist"):
        hdrq.save(deployed, tmp_path / "nowhere" / "m.safetensors")
    with pytest.raises(ValueError, match=r"hdrq.load: device is 'meta', which holds no values"):
        hdrq.load(good, device="meta")
    with pytest.raises(ValueError, match=r"hdrq.load: device must name a torch device .* got 'gpu'"):
        hdrq.load(good, device="gpu")
    assert torch.equal(hdrq.load(os.fsencode(good))(x), deployed(x))  # a bytes path is a path


def test_convert_names_bad_options(quantized):
    (a, _), _ = quantized
    with pytest.raises(TypeError, match=r"convert: config must be a hdrq.deploy.ConvertConfig, got dict"):
        hdrq.convert(a, {"act": "dynamic"}, verbose=False)
    with pytest.raises(ValueError, match=r"convert: skip names modules the model does not have: \['nope'\]"):
        hdrq.convert(a, skip=["nope"], verbose=False)
    with pytest.raises(TypeError, match=r"skip must be a list of module names, got '0' \(write skip=\['0'\]\)"):
        hdrq.convert(a, skip="0", verbose=False)
    assert "0" not in dict(qlayers(hdrq.convert(a, skip=["0"], verbose=False)))


# ------------------------------------------------------------------------------------------------ devices


def _absent_cuda() -> str:
    """A CUDA device this machine does not have."""
    return f"cuda:{torch.cuda.device_count()}" if torch.cuda.is_available() else "cuda"


def test_devices_are_checked():
    for bad, err, what in [("gpu", ValueError, "must name a torch device"), (3, TypeError, "got int 3"),
                           ("meta", ValueError, "is 'meta', which holds no values")]:
        with pytest.raises(err, match=f"QuantConfig: device {what}" if err is ValueError else what):
            hdrq.QuantConfig(device=bad)
        with pytest.raises(err, match=what):
            hdrq.QuantConfig(cache_device=bad)
    # A config naming a device this machine lacks can still be made (and read back from a model's
    # hdrq_config); quantize refuses it before any work.
    cfg = hdrq.QuantConfig(device=_absent_cuda(), **RTN)
    assert hdrq.QuantConfig(**cfg.to_dict()) == cfg
    with pytest.raises(ValueError, match=r"hdrq.quantize: the calibration device .* is 'cuda(:\d+)?' but "
                                         r"(cuda is not available on this machine|this machine has \d+ cuda)"):
        hdrq.quantize(mlp(), torch.randn(4, 16), cfg)
    with pytest.raises(ValueError, match=r"calibration device .* is 'meta'"):
        hdrq.quantize(mlp().to("meta"), torch.randn(4, 16), hdrq.QuantConfig(**RTN))
    assert hdrq.QuantConfig(device=torch.device("cpu")).device == "cpu"


# ------------------------------------------------------------------------------------------------ calibration data


def test_calibration_data_is_capped():
    def endless():
        for i in itertools.count():
            yield torch.full((3, 2), float(i))

    with pytest.warns(UserWarning, match=r"took the first 10 calibration samples \(max_calib_samples\)"):
        data = collect_calib_data(endless(), max_samples=10)
    assert data.shape == (10, 2) and data[-1, 0] == 3  # batches 0, 1, 2 and one sample of batch 3
    x = torch.randn(12, 2)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # exactly the cap, or no cap: no warning
        assert torch.equal(collect_calib_data([x[:6], x[6:]], max_samples=12), x)
        assert torch.equal(collect_calib_data(x, max_samples=None), x)
    with pytest.warns(UserWarning, match="first 5"):
        assert torch.equal(collect_calib_data(x, max_samples=5), x[:5])
    assert hdrq.QuantConfig().max_calib_samples == MAX_CALIB_SAMPLES
    with pytest.raises(ValueError, match="max_calib_samples must be a positive int or None, got 0"):
        hdrq.QuantConfig(max_calib_samples=0)
    # through quantize: an endless DataLoader-like iterable ends at the configured cap
    with pytest.warns(UserWarning, match="first 7"):
        q = hdrq.quantize(mlp(), (torch.randn(4, 16) for _ in itertools.count()),
                          hdrq.QuantConfig(max_calib_samples=7, **RTN))
    assert len(dict(quant_layers(q))) == 2


@pytest.mark.parametrize("bad, err, match", [
    (torch.randn(16), ValueError, r"calib_data must be a batch \[N, ...\] .* got shape \(16,\): for one sample pass "
                                  r"x.unsqueeze\(0\)"),
    ([torch.randn(16)] * 3, ValueError, r"calib_data item 0 .* got shape \(16,\).*torch.stack\(samples\)"),
    (torch.tensor(1.0), ValueError, "got a scalar"),
    (torch.full((4, 16), float("nan")), ValueError, r"calib_data has 64 NaN or infinite values \(of 64\)"),
    ([torch.randn(4, 16), torch.full((2, 16), float("inf"))], ValueError, "calib_data item 1 has 32 NaN or infinite"),
    (torch.randn(4, 16, device="meta"), ValueError, "on the meta device"),
    (torch.randn(4, 16).to_sparse(), TypeError, r"sparse_coo tensor; pass a dense one \(x.to_dense\(\)\)"),
    (torch.randn(4, 16, dtype=torch.complex64), TypeError, "complex tensor"),
    ({"pixel_values": torch.randn(4, 16)}, TypeError, r"calib_data is a dict; .*calib_data\['pixel_values'\]"),
    ([{"x": torch.randn(4, 16)}], TypeError, r"calib_data item 0 is a dict \(keys \['x'\]\)"),
    ("images", TypeError, "got str"),
])
def test_malformed_calibration_data_is_refused(bad, err, match):
    with pytest.raises(err, match=match):
        hdrq.quantize(mlp(), bad, hdrq.QuantConfig(**RTN))


def test_a_batch_of_one_sample_is_fine():
    q = hdrq.quantize(mlp(), torch.randn(16).unsqueeze(0), hdrq.QuantConfig(**RTN))
    assert len(dict(quant_layers(q))) == 2


# ------------------------------------------------------------------------------------------------ layers left float


class Conv1D(nn.Module):
    """A stand-in for transformers' Conv1D (GPT-2): a Linear with a transposed [in, out] weight."""

    def __init__(self, nf: int, nx: int):
        super().__init__()
        self.nf, self.nx = nf, nx
        self.weight = nn.Parameter(torch.randn(nx, nf) * 0.1)
        self.bias = nn.Parameter(torch.zeros(nf))

    def forward(self, x):
        return torch.addmm(self.bias, x.reshape(-1, x.shape[-1]), self.weight).reshape(*x.shape[:-1], self.nf)


class Mixed(nn.Module):
    """Every kind of layer: quantizable ones, ones with weights hdrq leaves float, and ones without weights
    to quantize (norms, a position embedding parameter)."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(20, 16)
        self.pos = nn.Parameter(torch.zeros(1, 5, 16))
        self.norm = nn.LayerNorm(16)
        self.attn = Conv1D(16, 16)
        self.conv1d = nn.Conv1d(5, 5, 3, padding=1)
        self.up = nn.ConvTranspose2d(1, 2, 2)
        self.conv2d = nn.Conv2d(2, 2, 1)
        self.bn = nn.BatchNorm1d(5)
        self.head = nn.Linear(2 * 3 * 5, 3)

    def forward(self, ids):
        h = self.norm(self.embed(ids) + self.pos)
        h = self.bn(self.conv1d(self.attn(h)))  # [N, 5, 16]
        h = self.conv2d(self.up(h[:, :1, :8].reshape(-1, 1, 2, 4)))  # [N, 2, 3, 5]
        return self.head(h.flatten(1))


def test_unquantizable_layers_are_reported_by_name():
    model = Mixed()
    found = unquantizable_layers(model)
    assert list(found) == ["embed", "conv1d", "up"]  # Conv1D is quantized as the nn.Linear it is
    assert found["embed"].startswith("Embedding: an embedding table")
    assert found["conv1d"] == "Conv1d: only nn.Linear and nn.Conv2d layers are quantized"
    assert "ConvTranspose2d" in found["up"]
    assert unquantizable_layers(nn.MultiheadAttention(8, 2)) == {
        "": "MultiheadAttention: only nn.Linear and nn.Conv2d layers are quantized"}
    ids = torch.randint(0, 20, (6, 5))
    with pytest.warns(UserWarning) as record:
        q = hdrq.quantize(model, ids, hdrq.QuantConfig(**RTN))
    msgs = [str(w.message) for w in record if "stay float" in str(w.message)]
    assert len(msgs) == 1
    assert msgs[0].startswith("hdrq.quantize: 3 layer(s) with weights stay float: 'embed' (Embedding: ")
    assert all(f"'{n}'" in msgs[0] for n in found)
    assert set(dict(quant_layers(q))) == {"attn", "conv2d", "head"}
    with pytest.warns(UserWarning, match=r"hdrq.convert: 3 layer\(s\) with weights stay float"):
        deployed = hdrq.convert(model, w_bits=8, a_bits=8, verbose=False)
    assert {n for n, m in deployed.named_modules() if isinstance(m, (QLinear, QConv2d))} == {"attn", "conv2d", "head"}


def test_nothing_is_reported_when_every_layer_is_quantized():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        hdrq.quantize(cnn(0), torch.randn(4, 3, 8, 8), hdrq.QuantConfig(**RTN))
        hdrq.convert(cnn(0), w_bits=8, a_bits=8, verbose=False)
    model = nn.Sequential(nn.Linear(4, 4), nn.LayerNorm(4), nn.BatchNorm1d(4), nn.PReLU(4), nn.GroupNorm(2, 4))
    assert unquantizable_layers(model) == {}
