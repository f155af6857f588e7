"""hdrq.convert / hdrq.save / hdrq.load: a hand-made calibrated model (the quantized-model contract) to real
integer layers, files round trip, and every way a file can be wrong."""
import copy
import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn

import hdrq
from conftest import make_generator
from hdrq import ops
from hdrq.deploy import FORMAT_VERSION, ConvertConfig
from hdrq.nn import QConv2d, QLinear, qlayers
from hdrq.quant import QuantConv2d, QuantLinear, fold_batchnorm, minmax_scale, mse_scale, quant_layers

torch.manual_seed(0)


class TinyNet(nn.Module):
    """A custom class (so it cannot be rebuilt from a file): conv-BN-ReLU, a strided grouped conv, a
    residual add, pooling and a classifier."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(8)
        self.conv2 = nn.Conv2d(8, 8, 3, stride=2, padding=1, groups=2)
        self.down = nn.Conv2d(8, 8, 1, stride=2)
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 10))

    def forward(self, x):
        x = torch.relu(self.bn1(self.conv1(x)))
        x = torch.relu(self.conv2(x) + self.down(x))
        return self.head(x)


def sequential_net():
    return nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), nn.BatchNorm2d(6), nn.ReLU(), nn.MaxPool2d(2),
                         nn.Flatten(), nn.Linear(6 * 3 * 3, 17), nn.GELU(), nn.Dropout(0.1), nn.Linear(17, 5))


def _replace(model, name, module):
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, module)


@torch.no_grad()
def calibrated(float_model, calib, *, w_bits=6, a_bits=6):
    """A quantized model in the hard-quantized state, made by hand (the calibration engine is another
    issue's): BN folded; first layer and last layer weights at 8 bits; the first layer's input (the image)
    not quantized; the other inputs unsigned (they follow a ReLU) where the layer follows a ReLU, with min-max
    step sizes from ``calib``; weights = MSE step * integers exactly."""
    model = fold_batchnorm(float_model.eval())
    layers = [(n, m) for n, m in model.named_modules() if type(m) in (nn.Linear, nn.Conv2d)]
    inputs = {}
    hooks = [m.register_forward_hook(lambda mod, inp, out, n=n: inputs.__setitem__(n, inp[0])) for n, m in layers]
    model(calib)
    for h in hooks:
        h.remove()
    for i, (name, m) in enumerate(layers):
        first, last = i == 0, i == len(layers) - 1
        x = inputs[name]
        signed = bool((x < 0).any())
        qm = (QuantLinear if isinstance(m, nn.Linear) else QuantConv2d)(
            m, 8 if first or last else w_bits, a_bits, a_signed=signed, a_enabled=not first)
        qm.weight_quantizer.set_scale(mse_scale(qm.weight, qm.weight_quantizer.bits, True, axis=0))
        qm.weight.copy_(qm.weight_quantizer(qm.weight))
        qm.act_quantizer.set_scale(minmax_scale(x, a_bits, signed))
        _replace(model, name, qm)
    model.hdrq_config = {"w_bits": w_bits, "a_bits": a_bits, "method": "by-hand"}
    return model.eval()


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(1)
    float_model = TinyNet()
    with torch.no_grad():  # non-trivial BN statistics
        float_model.bn1.running_mean.uniform_(-0.5, 0.5)
        float_model.bn1.running_var.uniform_(0.5, 2.0)
        float_model.bn1.weight.uniform_(0.5, 1.5)
    calib = torch.randn(8, 3, 9, 11)
    return float_model, calibrated(float_model, calib), torch.randn(5, 3, 9, 11)


def output_tol(model_fq, x):
    with torch.no_grad():
        ref = model_fq(x)
    return dict(rtol=1e-4, atol=1e-5 * float(ref.abs().max()) + 1e-6)


# ------------------------------------------------------------------------------------------------ convert


def test_convert_calibrated_model_exactly(tiny):
    _, fq, x = tiny
    before = {k: v.clone() for k, v in fq.state_dict().items()}
    dq = hdrq.convert(fq, verbose=False)
    # the input model is untouched
    assert all(torch.equal(v, before[k]) for k, v in fq.state_dict().items())
    assert isinstance(fq.conv1, QuantConv2d)
    fq_layers = dict(quant_layers(fq))
    d_layers = dict(qlayers(dq))
    assert sorted(fq_layers) == sorted(d_layers) == ["conv1", "conv2", "down", "head.2"]
    for name, layer in fq_layers.items():
        d = d_layers[name]
        assert torch.equal(d.integer_weight(), layer.weight_integers().to(torch.int8)), name
        assert torch.equal(d.weight_scale, layer.weight_quantizer.step_size().detach()), name
        assert d.w_bits == layer.weight_quantizer.bits and d.a_signed == layer.act_quantizer.signed
    assert d_layers["conv1"].act == "float" and d_layers["conv2"].act == "static"
    assert (d_layers["conv1"].w_bits, d_layers["conv2"].storage_bits, d_layers["head.2"].storage_bits) == (8, 6, 8)
    assert isinstance(dq.bn1, nn.Identity) and dq.hdrq_config == fq.hdrq_config
    assert dq.hdrq_deploy["act"] == "static"
    with torch.no_grad():
        torch.testing.assert_close(dq(x), fq(x), **output_tol(fq, x))


def test_convert_dynamic_and_off_act_options(tiny):
    _, fq, x = tiny
    dq = hdrq.convert(fq, ConvertConfig(act="dynamic", off_act="dynamic8"), verbose=False)
    assert all(m.act == "dynamic" for _, m in qlayers(dq))
    assert dq.conv1.a_bits == 8
    with torch.no_grad():
        y, ref = dq(x), fq(x)
    # different input quantization: close to the fake-quant model, not equal
    assert not torch.equal(y, ref)
    assert float((y - ref).norm() / ref.norm()) < 0.2


def test_convert_float_model_by_rtn():
    model = sequential_net().eval()
    dq = hdrq.convert(model, w_bits=8, a_bits=8, observer="minmax", skip=("8",), verbose=False)
    assert isinstance(dq[0], QConv2d) and isinstance(dq[5], QLinear) and type(dq[8]) is nn.Linear
    assert isinstance(model[0], nn.Conv2d)  # untouched
    assert dq[5].act == "dynamic"
    x = torch.randn(3, 3, 6, 6)
    with torch.no_grad():
        y, ref = dq(x), model(x)
    assert float((y - ref).norm() / ref.norm()) < 0.05  # W8A8 RTN of a random net: close to float
    single = hdrq.convert(nn.Linear(5, 3), w_bits=6, a_bits=6, verbose=False)  # a bare layer
    assert isinstance(single, QLinear) and single.storage_bits == 6


def test_convert_errors(tiny):
    _, fq, _ = tiny
    with pytest.raises(ValueError, match="no QuantLinear / QuantConv2d"):
        hdrq.convert(sequential_net(), verbose=False)
    with pytest.raises(ValueError, match="give both w_bits and a_bits"):
        hdrq.convert(sequential_net(), w_bits=8, verbose=False)
    with pytest.raises(ValueError, match="act must be 'static' or 'dynamic'"):
        ConvertConfig(act="float")
    noisy = copy.deepcopy(fq)  # a copy: the fixture is shared
    noisy.conv2.act_quantizer.set_mode("noise")
    with pytest.raises(ValueError, match=r"layer 'conv2'.*act quantizer must be 'hard' or 'off'"):
        hdrq.convert(noisy, verbose=False)


def test_convert_merged_model_from_the_engines(tmp_path):
    """The demo's path: two calibrated copies (hdrq.quantize), merged (hdrq.merge), converted, saved, loaded."""
    torch.manual_seed(2)
    a = TinyNet().eval()
    b = copy.deepcopy(a)
    with torch.no_grad():
        for p in b.parameters():
            p.add_(0.02 * torch.randn_like(p))
    calib = torch.randn(8, 3, 9, 11)
    cfg = hdrq.QuantConfig(method="rtn", w_bits=6, a_bits=6, verbose=False)
    merged = hdrq.merge([hdrq.quantize(a, calib, cfg), hdrq.quantize(b, calib, cfg)], method="hdrq", seed=0)
    dq = hdrq.convert(merged, verbose=False)
    for name, layer in quant_layers(merged):
        assert torch.equal(dq.get_submodule(name).integer_weight(), layer.weight_integers().to(torch.int8))
    x = torch.randn(4, 3, 9, 11)
    with torch.no_grad():
        y = dq(x)
        torch.testing.assert_close(y, merged(x), **output_tol(merged, x))
        hdrq.save(dq, tmp_path / "merged.safetensors")
        assert torch.equal(hdrq.load(tmp_path / "merged.safetensors", model=TinyNet())(x), y)


# ------------------------------------------------------------------------------------------------ save / load


@pytest.fixture(scope="module")
def saved(tiny, tmp_path_factory):
    _, fq, x = tiny
    dq = hdrq.convert(fq, verbose=False)
    path = tmp_path_factory.mktemp("deploy") / "tiny.safetensors"
    hdrq.save(dq, path)
    return dq, path, x


def test_round_trip_into_skeletons(saved, tiny):
    dq, path, x = saved
    float_model, fq, _ = tiny
    with torch.no_grad():
        ref = dq(x)
    # the float architecture (BatchNorm still there), its fake-quant form, and the converted model itself
    for skeleton in (TinyNet(), calibrated(TinyNet(), torch.randn(2, 3, 9, 11)), hdrq.convert(fq, verbose=False)):
        loaded = hdrq.load(path, model=skeleton)
        assert loaded is skeleton and not loaded.training
        assert isinstance(loaded.bn1, nn.Identity) and isinstance(loaded.conv2, QConv2d)
        assert loaded.hdrq_config == fq.hdrq_config and loaded.hdrq_deploy == dq.hdrq_deploy
        with torch.no_grad():
            assert torch.equal(loaded(x), ref)
        for name, layer in qlayers(dq):
            assert torch.equal(loaded.get_submodule(name).integer_weight(), layer.integer_weight())


def test_file_holds_canonical_integers(saved):
    dq, path, _ = saved
    with safe_open(str(path), "pt") as f:
        keys = set(f.keys())
        meta = json.loads(f.metadata()["hdrq"])
        conv2 = f.get_tensor("conv2.weight_int6")
        head = f.get_tensor("head.2.weight_int8")
    assert not any("qweight" in k for k in keys)  # the kernel layout never reaches a file
    assert {"conv2.weight_scale", "conv2.bias", "conv2.act_scale", "conv1.weight_int8", "down.weight_int6"} <= keys
    # conv2: 6-bit, K = 4 * 3 * 3 = 36 per group
    assert torch.equal(ops.unpack_int6(conv2, [8, 36]), dq.conv2.integer_weight().reshape(8, 36))
    assert torch.equal(head, dq.head[2].integer_weight())
    assert meta["format_version"] == FORMAT_VERSION and meta["config"]["w_bits"] == 6
    spec = {e["path"]: e for e in meta["modules"]}["conv2"]
    assert spec["spec"]["w_bits"] == 6 and spec["spec"]["groups"] == 2 and spec["spec"]["in_channels"] == 8


def test_round_trip_rebuilds_known_modules(tmp_path):
    model = sequential_net().eval()
    calib = torch.randn(6, 3, 6, 6)
    fq = calibrated(model, calib, w_bits=4, a_bits=4)
    dq = hdrq.convert(fq, verbose=False)
    path = tmp_path / "seq.safetensors"
    hdrq.save(dq, path)
    loaded = hdrq.load(path)  # no skeleton needed: every module is a known one
    assert isinstance(loaded, nn.Sequential) and isinstance(loaded[1], nn.Identity)
    assert loaded[6].approximate == model[6].approximate and loaded[7].p == 0.1
    x = torch.randn(4, 3, 6, 6)
    with torch.no_grad():
        assert torch.equal(loaded(x), dq(x))
        torch.testing.assert_close(dq(x), fq(x), **output_tol(fq, x))
    # a single layer
    hdrq.save(dq[5], tmp_path / "layer.safetensors")
    layer = hdrq.load(tmp_path / "layer.safetensors")
    assert isinstance(layer, QLinear) and torch.equal(layer(x.reshape(4, -1)[:, :54]), dq[5](x.reshape(4, -1)[:, :54]))


def test_custom_model_needs_a_skeleton(saved):
    _, path, _ = saved
    with pytest.raises(ValueError, match=r"TinyNet at ''.*hdrq.load\(path, model="):
        hdrq.load(path)


def _expect_load_error(path, match=None):
    with pytest.raises(ValueError, match=match):
        hdrq.load(path, model=TinyNet())


def test_truncated_files(saved, tmp_path):
    _, path, _ = saved
    data = path.read_bytes()
    for keep in (0, 5, 8, 100, len(data) // 2, len(data) - 1):
        bad = tmp_path / f"cut{keep}.safetensors"
        bad.write_bytes(data[:keep])
        _expect_load_error(bad, "truncated or corrupted")


def test_flipped_bytes(saved, tmp_path):
    _, path, _ = saved
    data = path.read_bytes()
    header = 8 + int.from_bytes(data[:8], "little")
    # positions in the length prefix, the JSON header and the tensor data (the last byte included), plus a
    # few random ones (every bit of every byte of a small file was checked once by hand: all raise ValueError)
    fixed = {3, 9, 40, header // 2, header - 3, header, header + 1, (header + len(data)) // 2, len(data) - 1}
    positions = sorted(fixed | set(torch.randint(8, len(data), (12,), generator=make_generator(0)).tolist()))
    for pos in positions:
        for bit in (0x01, 0x10):
            corrupt = bytearray(data)
            corrupt[pos] ^= bit
            bad = tmp_path / "flip.safetensors"
            bad.write_bytes(bytes(corrupt))
            with pytest.raises(ValueError):
                hdrq.load(bad, model=TinyNet())
    # a tensor's bytes changed in a well-formed file: only the checksum sees it
    tensors, meta = load_file(str(path)), safe_open(str(path), "pt").metadata()
    tensors["conv2.weight_scale"][3] *= 1.0001
    save_file(tensors, str(tmp_path / "tampered.safetensors"), metadata=meta)
    _expect_load_error(tmp_path / "tampered.safetensors", "checksum mismatch")


def _rewrite_meta(path, out, edit):
    tensors = load_file(str(path))
    with safe_open(str(path), "pt") as f:
        meta = f.metadata()
    info = json.loads(meta["hdrq"])
    edit(info)
    save_file(tensors, str(out), metadata={**meta, "hdrq": json.dumps(info)})


def test_wrong_format_version_and_foreign_files(saved, tmp_path):
    _, path, _ = saved
    _rewrite_meta(path, tmp_path / "v2.safetensors", lambda info: info.update(format_version=FORMAT_VERSION + 1))
    _expect_load_error(tmp_path / "v2.safetensors", rf"format version {FORMAT_VERSION + 1}.*reads version "
                                                     rf"{FORMAT_VERSION}")
    _rewrite_meta(path, tmp_path / "fmt.safetensors", lambda info: info.update(format="other"))
    _expect_load_error(tmp_path / "fmt.safetensors", "unknown format 'other'")
    save_file({"w": torch.randn(3)}, str(tmp_path / "plain.safetensors"))
    _expect_load_error(tmp_path / "plain.safetensors", "without hdrq metadata")
    # metadata edited without updating the checksum
    _rewrite_meta(path, tmp_path / "edited.safetensors", lambda info: info.update(config={"w_bits": 4}))
    _expect_load_error(tmp_path / "edited.safetensors", "checksum mismatch")


def test_mismatched_skeletons_are_refused_untouched(saved):
    _, path, _ = saved
    wide = TinyNet()
    wide.head[2] = nn.Linear(8, 11)
    with pytest.raises(ValueError, match=r"shape mismatch at module 'head.2': out_features: file 10, model 11"):
        hdrq.load(path, model=wide)
    assert isinstance(wide.conv1, nn.Conv2d) and isinstance(wide.bn1, nn.BatchNorm2d)  # nothing was replaced
    strided = TinyNet()
    strided.down = nn.Conv2d(8, 8, 1, stride=1)
    with pytest.raises(ValueError, match=r"module 'down'.*stride: file \(2, 2\), model \(1, 1\)"):
        hdrq.load(path, model=strided)
    extra = TinyNet()
    extra.extra = nn.ReLU()
    with pytest.raises(ValueError, match=r"only in the model \['extra'\]"):
        hdrq.load(path, model=extra)
    other = TinyNet()
    other.down = nn.Linear(8, 8)
    with pytest.raises(ValueError, match=r"module 'down' is a QConv2d in the file but a Linear"):
        hdrq.load(path, model=other)


def test_mismatched_float_tensors(tmp_path):
    model = nn.Sequential(nn.Linear(4, 6), nn.LayerNorm(6))
    path = tmp_path / "ln.safetensors"
    hdrq.save(hdrq.convert(model, w_bits=8, a_bits=8, verbose=False), path)
    assert torch.equal(hdrq.load(path, model=nn.Sequential(nn.Linear(4, 6), nn.LayerNorm(6)))[1].weight,
                       model[1].weight)
    with torch.device("meta"):  # a skeleton that allocates nothing
        skeleton = nn.Sequential(nn.Linear(4, 6), nn.LayerNorm(6))
    with pytest.raises(ValueError, match="meta device; pass device="):
        hdrq.load(path, model=skeleton)
    loaded = hdrq.load(path, model=skeleton, device="cpu")
    x = torch.randn(3, 4)
    assert torch.equal(loaded[1].bias, model[1].bias) and not loaded[1].bias.is_meta
    assert torch.equal(loaded(x), hdrq.load(path)(x))
    with pytest.raises(ValueError, match=r"shape/dtype mismatch at '1.bias': file torch.float32 \(6,\), model "
                                         r"torch.float16 \(6,\)"):
        hdrq.load(path, model=nn.Sequential(nn.Linear(4, 6), nn.LayerNorm(6)).half())
    with pytest.raises(ValueError, match=r"shape/dtype mismatch at '1.bias': file torch.float32 \(6,\), model "
                                         r"torch.float32 \(7,\)"):
        hdrq.load(path, model=nn.Sequential(nn.Linear(4, 6), nn.LayerNorm(7)))


def test_save_errors(tmp_path):
    with pytest.raises(ValueError, match="convert it first"):
        hdrq.save(sequential_net(), tmp_path / "x.safetensors")
    assert not (tmp_path / "x.safetensors").exists()


# ------------------------------------------------------------------------------------------------ on the GPU


@pytest.mark.cuda
def test_cuda_convert_save_load(tiny, saved):
    _, fq, x = tiny
    dq_cpu, path, _ = saved
    fqc = copy.deepcopy(fq).cuda()  # the fixture stays on the CPU
    dq = hdrq.convert(fqc, verbose=False)
    assert dq.conv2.qweight.is_cuda
    xc = x.cuda()
    with torch.no_grad():
        torch.testing.assert_close(dq(xc), fqc(xc), **output_tol(fqc, xc))
        loaded = hdrq.load(path, model=TinyNet(), device="cuda")
        assert loaded.conv2.qweight.is_cuda and loaded.head[2].weight_scale.is_cuda
        torch.testing.assert_close(loaded(xc).cpu(), dq_cpu(x), **output_tol(fq, x))
