"""hdrq.data: the digits domains and the image-folder reader."""
import os

import pytest
import torch

from hdrq.data import (DEFAULT_DIGIT_TARGETS, DIGIT_SHIFTS, DomainData, ImageFolderDomains, make_digits_domains)

PIL = pytest.importorskip("PIL")
from PIL import Image  # noqa: E402


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """These tiny models run one CPU thread, as the demo does: on a shared 2-core machine two intra-op threads
    mostly wait on each other (see hdrq.demo._plan_workers)."""
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
    from hdrq.demo import SmallResNet, evaluate, train_source

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
    from hdrq.cli import main

    for root in (tmp_path / "nope", tmp_path):
        with pytest.raises(SystemExit) as e:
            main(["demo", "--data", "folders", "--root", str(root), "--source", "Art", "-q",
                  "--out", str(tmp_path / "out")])
        assert e.value.code == 2
        err = capsys.readouterr().err
        assert str(root) in err and ("does not exist" in err or "no images found" in err)
    assert not os.path.exists(tmp_path / "out" / "results.json")
