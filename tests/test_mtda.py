"""hdrq.demo and the ``hdrq`` command: the pieces, and ``hdrq demo --quick`` end to end."""
import json
import math
import os

import pytest
import torch

from hdrq.cli import _demo_config, main
from hdrq.data import make_digits_domains
from hdrq.demo import (METHODS, DemoConfig, SmallResNet, adapt_shot, evaluate, harmonic_mean,
                       information_maximization_loss, shot_pseudo_labels, train_source)

CPU = torch.device("cpu")


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """These tiny models run one CPU thread, as the demo does: on a shared 2-core machine two intra-op threads
    mostly wait on each other (see hdrq.demo._plan_workers)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# ------------------------------------------------------------------------------------------------
# pieces
# ------------------------------------------------------------------------------------------------


def test_harmonic_mean():
    assert harmonic_mean([0.5, 0.5]) == pytest.approx(0.5)
    assert harmonic_mean([0.2, 0.8]) == pytest.approx(2 / (1 / 0.2 + 1 / 0.8))
    assert harmonic_mean([0.9, 0.0, 0.7]) == 0.0
    with pytest.raises(ValueError):
        harmonic_mean([])
    with pytest.raises(ValueError):
        harmonic_mean([0.5, -0.1])


def test_information_maximization_loss_prefers_confident_and_diverse():
    n, c = 40, 10
    confident_diverse = torch.full((n, c), -10.0)
    confident_diverse[torch.arange(n), torch.arange(n) % c] = 10.0
    collapsed = torch.full((n, c), -10.0)
    collapsed[:, 3] = 10.0
    uniform = torch.zeros(n, c)
    best = information_maximization_loss(confident_diverse)
    assert best == pytest.approx(-math.log(c), abs=1e-3)   # entropy 0, diversity log(c)
    assert information_maximization_loss(collapsed) == pytest.approx(0.0, abs=1e-3)
    assert information_maximization_loss(uniform) == pytest.approx(0.0, abs=1e-3)
    assert best < information_maximization_loss(collapsed) and best < information_maximization_loss(uniform)


def test_small_resnet_forward_and_bn_folding():
    from hdrq.quant import fold_batchnorm

    torch.manual_seed(0)
    model = SmallResNet(3, 7, (4, 8, 6))
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):  # non-trivial statistics so folding is really tested
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
            m.weight.data.uniform_(0.5, 1.5)
            m.bias.data.uniform_(-0.2, 0.2)
    model.eval()
    x = torch.rand(5, 3, 17, 17)
    y = model(x)
    assert y.shape == (5, 7)
    folded = fold_batchnorm(model)
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in folded.modules())
    torch.testing.assert_close(folded(x), y, rtol=1e-4, atol=1e-5)


@pytest.fixture(scope="module")
def trained():
    suite = make_digits_domains(seed=0, max_images=500, targets=("rotate", "thick"))
    torch.manual_seed(0)
    model = SmallResNet(1, 10, (8, 16, 16))
    train_source(model, suite.source, epochs=12, lr=1e-2, batch_size=64, seed=0, device=CPU)
    return suite, model


def test_adapt_shot_trains_features_only(trained):
    import copy

    suite, source = trained
    model = copy.deepcopy(source)
    target = suite.targets[0]
    adapt_shot(model, target.x_train, epochs=1, lr=1e-2, batch_size=64, seed=0, device=CPU,
               pseudo_label_weight=0.3)
    assert torch.equal(model.fc.weight, source.fc.weight) and torch.equal(model.fc.bias, source.fc.bias)
    assert not torch.equal(model.conv1.weight, source.conv1.weight)
    # BatchNorm statistics moved towards the target
    assert not torch.equal(model.bn1.running_mean, source.bn1.running_mean)
    assert all(p.requires_grad for p in model.parameters()) and not model.training
    # the IM objective went down on the target data
    with torch.no_grad():
        before = information_maximization_loss(source.eval()(target.x_train))
        after = information_maximization_loss(model(target.x_train))
    assert after < before


def test_shot_pseudo_labels_follow_a_good_classifier(trained):
    suite, model = trained
    x = suite.source.x_test
    labels = shot_pseudo_labels(model, x, batch_size=37)
    assert labels.shape == (x.shape[0],) and labels.dtype == torch.int64
    assert int(labels.min()) >= 0 and int(labels.max()) < 10
    with torch.no_grad():
        pred = model(x).argmax(dim=1)
    # on the source domain the classifier is good, and clustering its features agrees with it
    assert (labels == pred).float().mean() > 0.85
    assert evaluate(model, x, suite.source.y_test, device=CPU, batch_size=7) == pytest.approx(
        float((pred == suite.source.y_test).float().mean()))


def test_config_presets_and_errors():
    quick, default, full = (DemoConfig.preset(p) for p in ("quick", "default", "full"))
    assert quick.seeds == (0,) and len(default.seeds) >= 3 and full.calib_iters is None
    assert set(quick.methods) == set(METHODS) and set(quick.bits) == {4, 6}
    assert DemoConfig.preset("default", calib_iters=7).calib_iters == 7
    with pytest.raises(ValueError, match="protocol"):
        DemoConfig.preset("medium")
    with pytest.raises(ValueError, match="methods"):
        DemoConfig.preset("quick", methods=("fp32", "gptq"))
    with pytest.raises(ValueError, match="bits"):
        DemoConfig.preset("quick", bits=(1,))
    with pytest.raises(ValueError, match="root and source"):
        DemoConfig.preset("quick", data="folders")
    with pytest.raises(ValueError, match="at least two targets"):
        DemoConfig.preset("quick", targets=("rotate",))


def test_cli_arguments_map_onto_the_config():
    from hdrq.cli import main as cli_main

    args = _parse(["demo", "--quick", "--w3a3", "--seeds", "2", "--methods", "fp32", "hdrq", "--calib-iters", "9",
                   "--noise-mode", "uniform", "--out", "o", "--quant-set", "hdrq.lambda_dist=0",
                   "--quant-set", "qdrop.noise_mode=uniform", "--eval-split", "val"])
    cfg = _demo_config(args)
    assert cfg.quant_overrides == {"hdrq": {"lambda_dist": 0}, "qdrop": {"noise_mode": "uniform"}}
    assert cfg.eval_split == "val"
    assert cfg.protocol == "quick" and cfg.bits == (3, 4, 6) and cfg.seeds == (0, 1)
    assert cfg.methods == ("fp32", "hdrq") and cfg.calib_iters == 9 and cfg.noise_mode == "uniform"
    assert cfg.out == "o"
    assert _demo_config(_parse(["demo", "--full"])).protocol == "full"
    with pytest.raises(SystemExit):
        cli_main(["demo", "--quick", "--full"])
    with pytest.raises(SystemExit):
        cli_main(["demo", "--quick", "--quant-set", "lambda_dist=0"])  # no METHOD.
    with pytest.raises(SystemExit):
        cli_main(["demo", "--quick", "--quant-set", "gptq.x=1"])


def _parse(argv):
    import argparse

    from hdrq.cli import _demo_parser

    parser = argparse.ArgumentParser()
    _demo_parser(parser.add_subparsers(dest="command"))
    return parser.parse_args(argv)


# ------------------------------------------------------------------------------------------------
# end to end
# ------------------------------------------------------------------------------------------------


def _check_results(res, bit_settings, methods, targets, barrier_methods):
    assert res["bit_settings"] == bit_settings and res["targets"] == targets
    for r in res["per_seed"]:
        for name in targets:
            a = r["adaptation"]["targets"][name]
            assert 0.0 <= a["source_only"] <= 1.0 and 0.0 <= a["adapted"] <= 1.0
        for key in bit_settings:
            assert set(r["methods"][key]) == set(methods)
            for method, m in r["methods"][key].items():
                accs = [m["merged"][n] for n in targets]
                assert all(0.0 <= a <= 1.0 for a in accs), (key, method, accs)
                assert all(0.0 <= m["unmerged"][n] <= 1.0 for n in targets)
                # the harmonic mean lies between the worst domain and the arithmetic mean
                assert min(accs) - 1e-12 <= m["merged_hm"] <= sum(accs) / len(accs) + 1e-12
                assert m["merged_hm"] == pytest.approx(harmonic_mean(accs))
                if method != "fp32":  # the merge ablation: the same models through the other merge
                    assert {m["merge"], m["other_merge"]["merge"]} == {"hdrq", "average"}
                    assert (m["merge"] == "hdrq") == (method == "hdrq")
                    o = [m["other_merge"]["merged"][n] for n in targets]
                    assert m["other_merge"]["merged_hm"] == pytest.approx(harmonic_mean(o))
                if method in barrier_methods:
                    b = m["barrier"]
                    assert len(b["lambdas"]) == len(b["losses"]) and all(math.isfinite(v) for v in b["losses"])
                    assert b["barrier"] == pytest.approx(max(b["losses"]) - (b["losses"][0] + b["losses"][-1]) / 2,
                                                         abs=1e-5)
    for key in bit_settings:
        s = res["summary"][key]
        for method in methods:
            assert 0.0 <= s[method]["merged_hm"]["mean"] <= 1.0 and s[method]["merged_hm"]["std"] >= 0.0


def test_demo_quick_end_to_end(tmp_path, capsys):
    out = tmp_path / "demo"
    assert main(["demo", "--quick", "--out", str(out)]) == 0
    res = json.loads((out / "results.json").read_text())
    cfg = DemoConfig.preset("quick")
    _check_results(res, ["W4A4", "W6A6"], list(METHODS), list(cfg.targets), {"fp32", "qdrop", "hdrq"})
    # the adapted models are useful: the smoke protocol is small, not broken
    adapted = [res["per_seed"][0]["adaptation"]["targets"][n]["adapted"] for n in res["targets"]]
    assert min(adapted) > 0.3, adapted
    fp = res["per_seed"][0]["methods"]["W6A6"]["fp32"]
    assert fp["merged_hm"] > 0.3 and fp["unmerged"] == {n: a for n, a in zip(res["targets"], adapted)}
    for png in ("merged_hm.png", "barrier_w4a4.png", "barrier_w6a6.png"):
        assert (out / png).stat().st_size > 1000 and png in res["plots"]
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    printed = capsys.readouterr().out
    assert "| hdrq |" in printed and "merged HM" in printed and "W4A4" in printed and "W6A6" in printed


def test_demo_runs_on_image_folders(tmp_path):
    from PIL import Image

    # three domains of four classes of noisy flat-coloured images: the class is the colour, the domain a tint
    g = torch.Generator().manual_seed(0)
    base = torch.tensor([[220, 40, 40], [40, 200, 40], [40, 40, 220], [200, 200, 40]], dtype=torch.float32)
    tint = {"Art": 0.0, "Clipart": 30.0, "Product": -30.0}
    for dom, t in tint.items():
        for ci in range(len(base)):
            d = tmp_path / "data" / dom / f"class{ci}"
            d.mkdir(parents=True)
            for i in range(10):
                img = (base[ci] + t + 25 * torch.randn(12, 12, 3, generator=g)).clamp(0, 255).to(torch.uint8)
                Image.fromarray(img.numpy()).save(d / f"{i}.png")
    out = tmp_path / "out"
    assert main(["demo", "--quick", "-q", "--data", "folders", "--root", str(tmp_path / "data"), "--source", "Art",
                 "--image-size", "8", "--methods", "fp32", "rtn", "--barrier-methods", "rtn", "--bits", "8",
                 "--out", str(out)]) == 0
    res = json.loads((out / "results.json").read_text())
    _check_results(res, ["W8A8"], ["fp32", "rtn"], ["Clipart", "Product"], {"fp32", "rtn"})
    assert res["source"] == "Art" and os.path.exists(out / "merged_hm.png")


def test_seeds_in_worker_processes_match_one_process(tmp_path):
    """Seeds run in spawned worker processes on the CPU; a seed's numbers do not depend on where it ran."""
    from hdrq.demo import run_demo

    common = dict(methods=("fp32", "rtn"), bits=(8,), barrier_methods=("rtn",), adapt_epochs=1)
    two = run_demo(DemoConfig.preset("quick", seeds=(0, 1), workers=2, out=str(tmp_path / "a"), **common),
                   verbose=False)
    one = run_demo(DemoConfig.preset("quick", seeds=(1,), workers=1, out=str(tmp_path / "b"), **common),
                   verbose=False)
    assert two["environment"]["processes"] == 2 and one["environment"]["processes"] == 1
    assert [r["seed"] for r in two["per_seed"]] == [0, 1]
    a, b = two["per_seed"][1], one["per_seed"][0]
    assert a["adaptation"] == b["adaptation"] and a["methods"] == b["methods"]
    assert a["adaptation"]["source_acc"] > 0.5  # a real model, so that equal numbers mean something
    assert two["per_seed"][0]["adaptation"] != a["adaptation"]


@pytest.mark.cuda
def test_demo_quick_on_the_gpu(tmp_path):
    """The same smoke protocol on the GPU (Triton/CUDA kernels behind hdrq.ops): every stage runs, and the
    numbers are as sane as on the CPU."""
    out = tmp_path / "gpu"
    assert main(["demo", "--quick", "-q", "--device", "cuda", "--out", str(out)]) == 0
    res = json.loads((out / "results.json").read_text())
    assert res["environment"]["device"].startswith("cuda") and res["environment"]["processes"] == 1
    _check_results(res, ["W4A4", "W6A6"], list(METHODS), list(DemoConfig.preset("quick").targets),
                   {"fp32", "qdrop", "hdrq"})
    adapted = [res["per_seed"][0]["adaptation"]["targets"][n]["adapted"] for n in res["targets"]]
    assert min(adapted) > 0.3, adapted
