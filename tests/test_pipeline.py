"""hdrq calibrate / merge / convert over files: clear errors before work, the one-process run, domain and
data parallelism under torchrun (2 CPU processes, gloo on loopback), and resuming a run killed with SIGKILL."""
import json
import os
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

import hdrq
from hdrq.calib.checkpoint import load_quantized, save_quantized
from hdrq.cli import main
from hdrq.pipeline import PipelineError, calibrate
from hdrq.quant import quant_layers

from pipeline_models import res_mlp

TESTS = os.path.dirname(os.path.abspath(__file__))
BUILDER = "pipeline_models:res_mlp"
TIMEOUT = 240  # seconds any one spawned run may take


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """A source checkpoint, three adapted targets (.pt, .safetensors), their data (.pt, .npy, .safetensors)
    and a config; HDRQ with short fixed iterations."""
    from safetensors.torch import save_file

    root = tmp_path_factory.mktemp("pipeline")
    torch.manual_seed(0)
    src = res_mlp()
    torch.save(src.state_dict(), root / "source.pt")
    targets, data = [], []
    for i in range(3):
        t = res_mlp()
        t.load_state_dict(src.state_dict())
        with torch.no_grad():
            for p in t.parameters():
                p.add_(0.05 * torch.randn_like(p))
        x = torch.randn(16, 8) + 0.3 * i
        if i == 1:
            save_file(t.state_dict(), str(root / f"target{i}.safetensors"))
            targets.append(str(root / f"target{i}.safetensors"))
            np.save(root / f"data{i}.npy", x.numpy())
            data.append(str(root / f"data{i}.npy"))
        else:
            torch.save(t.state_dict(), root / f"target{i}.pt")
            targets.append(str(root / f"target{i}.pt"))
            if i == 2:
                save_file({"x": x}, str(root / f"data{i}.safetensors"))
                data.append(str(root / f"data{i}.safetensors"))
            else:
                torch.save(x, root / f"data{i}.pt")
                data.append(str(root / f"data{i}.pt"))
    config = root / "config.json"
    config.write_text(json.dumps({"method": "hdrq", "iters": 6, "calib_batch_size": 4, "noise_mode": "uniform",
                                  "w_bits": 4, "a_bits": 4}))
    return dict(root=root, source=str(root / "source.pt"), targets=targets, data=data, config=str(config))


def _args(f, out, *extra):
    return ["calibrate", "--source", f["source"], "--targets", *f["targets"], "--data", *f["data"], "--config",
            f["config"], "--out", str(out), "--builder", BUILDER, "--device", "cpu", *extra]


def _env():
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([TESTS, os.environ.get("PYTHONPATH", "")]),
               OMP_NUM_THREADS="1", GLOO_SOCKET_IFNAME="lo", MASTER_ADDR="127.0.0.1")
    env.pop("WORLD_SIZE", None)
    return env


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _torchrun(args, cwd):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc-per-node", "2",
           "--master-addr", "127.0.0.1", "--master-port", str(_free_port()), "-m", "hdrq", *args]
    r = subprocess.run(cmd, cwd=cwd, env=_env(), capture_output=True, text=True, timeout=TIMEOUT)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return r


def _bytes(path):
    with open(path, "rb") as f:
        return f.read()


@pytest.fixture(scope="module")
def one_process(files):
    out = files["root"] / "one"
    assert main(_args(files, out, "--merge", "hdrq")) == 0
    return out


# ------------------------------------------------------------------------------------------------
# errors before any work
# ------------------------------------------------------------------------------------------------


def _fails(files, capsys, *, match, **changes):
    kw = dict(source=files["source"], targets=files["targets"], data=files["data"], config=files["config"],
              out=str(files["root"] / "never"), builder=BUILDER, device="cpu")
    kw.update(changes)
    with pytest.raises(PipelineError, match=match):
        calibrate(**kw, log=lambda m: None)
    assert not os.path.exists(files["root"] / "never")  # nothing was started


def test_bad_files_are_named_before_any_work(files, tmp_path, capsys):
    root = files["root"]
    _fails(files, capsys, match="source .*missing.pt: no such file", source=str(root / "missing.pt"))
    _fails(files, capsys, match="pass --builder module:factory", builder=None)
    _fails(files, capsys, match="cannot import it", builder="no_such_module:f")
    _fails(files, capsys, match="not an nn.Module", builder="pipeline_models:not_a_module")
    _fails(files, capsys, match=r"does not fit --builder pipeline_models:wider: .*shapes that differ",
           builder="pipeline_models:wider")
    _fails(files, capsys, match="one --data file per --targets model: 3 targets, 2 data files",
           data=files["data"][:2])
    _fails(files, capsys, match="calibration data .*nope.pt: no such file", data=[*files["data"][:2], "nope.pt"])
    torch.save(torch.empty(0, 8), tmp_path / "empty.pt")
    _fails(files, capsys, match=r"expected a non-empty tensor", data=[*files["data"][:2], str(tmp_path / "empty.pt")])
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"method": "hdrq", "iterations": 3}))
    _fails(files, capsys, match=r"unknown QuantConfig fields \['iterations'\]", config=str(bad))
    bad.write_text(json.dumps({"w_bits": 9}))
    _fails(files, capsys, match="w_bits must be an int from 2 to 8, got 9", config=str(bad))
    torch.save({"stem.weight": torch.zeros(3)}, tmp_path / "wrong.pt")
    _fails(files, capsys, match="target .*wrong.pt does not fit", targets=[*files["targets"][:2],
                                                                           str(tmp_path / "wrong.pt")])
    # the command line turns these into a usage error with the message
    with pytest.raises(SystemExit) as e:
        main(["calibrate", "--source", str(root / "missing.pt"), "--targets", *files["targets"], "--data",
              *files["data"], "--out", str(tmp_path / "o"), "--builder", BUILDER])
    assert e.value.code == 2 and "no such file" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------------
# one process, then merge and convert
# ------------------------------------------------------------------------------------------------


def test_one_process_calibrate_merge_convert(files, one_process, tmp_path):
    names = ["target0", "target1", "target2"]
    for n in names:
        assert (one_process / f"{n}.quant.safetensors").is_file()
        report = json.loads((one_process / f"{n}.report.json").read_text())
        assert [r["name"] for r in report] == ["stem", "blocks.0", "blocks.1", "blocks.2", "head"]
    arch = res_mlp()
    q0 = load_quantized(one_process / "target0.quant.safetensors", arch)
    assert all(layer.is_compact for _, layer in quant_layers(q0))
    # the file holds what hdrq.quantize returns for the same inputs
    t0 = res_mlp()
    t0.load_state_dict(torch.load(files["targets"][0]))
    cfg = hdrq.QuantConfig(method="hdrq", iters=6, calib_batch_size=4, noise_mode="uniform", verbose=False,
                           device="cpu")
    src = res_mlp()
    src.load_state_dict(torch.load(files["source"]))
    direct = hdrq.quantize(t0, torch.load(files["data"][0]), cfg, source=src)
    x = torch.randn(5, 8)
    with torch.no_grad():
        assert torch.equal(q0(x), direct(x))
    # hdrq merge over the files equals the merged file calibrate wrote
    merged = tmp_path / "m.quant.safetensors"
    assert main(["merge", "--models", *[str(one_process / f"{n}.quant.safetensors") for n in names], "--out",
                 str(merged)]) == 0
    assert _bytes(merged) == _bytes(one_process / "merged.quant.safetensors")
    deploy = tmp_path / "m.safetensors"
    assert main(["convert", "--model", str(merged), "--out", str(deploy)]) == 0
    qm = load_quantized(merged, arch)
    loaded = hdrq.load(deploy, model=res_mlp())
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), hdrq.convert(qm, verbose=False)(x))


def test_save_quantized_round_trip_keeps_boundaries(tmp_path):
    from test_calib import TinyResNet

    torch.manual_seed(0)
    model = TinyResNet().eval()
    q = hdrq.quantize(model, torch.randn(24, 1, 8, 8), hdrq.QuantConfig(method="qdrop", iters=3, calib_batch_size=8,
                                                                       verbose=False))
    save_quantized(q, tmp_path / "r.quant.safetensors")
    back = load_quantized(tmp_path / "r.quant.safetensors", TinyResNet())
    x = torch.randn(4, 1, 8, 8)
    with torch.no_grad():
        assert torch.equal(back(x), q(x))
    assert back.layer1[0].block_output_quantizer.mode == "hard"
    raw = bytearray(_bytes(tmp_path / "r.quant.safetensors"))
    raw[-3] ^= 0xFF
    (tmp_path / "bad.quant.safetensors").write_bytes(bytes(raw))
    with pytest.raises(ValueError, match="checksum mismatch"):
        load_quantized(tmp_path / "bad.quant.safetensors", TinyResNet())


# ------------------------------------------------------------------------------------------------
# torchrun: 2 CPU processes
# ------------------------------------------------------------------------------------------------


def test_domain_parallel_is_bit_identical_to_one_process(files, one_process, tmp_path):
    out = tmp_path / "domain"
    _torchrun(_args(files, out, "--merge", "hdrq", "--parallel", "domain"), tmp_path)
    for n in ("target0", "target1", "target2", "merged"):
        assert _bytes(out / f"{n}.quant.safetensors") == _bytes(one_process / f"{n}.quant.safetensors"), n


def test_data_parallel_matches_one_process_up_to_reduction_order(files, tmp_path):
    """BRECQ (no sampled noise inside the block): the processes train on halves of each batch and sum their
    gradients, so they follow the one-process run up to the order of floating-point sums."""
    config = tmp_path / "brecq.toml"
    config.write_text('method = "brecq"\niters = 6\nact_iters = 3\ncalib_batch_size = 4\n')
    one = tmp_path / "one"
    args = ["calibrate", "--source", files["source"], "--targets", files["targets"][0], "--data", files["data"][0],
            "--config", str(config), "--builder", BUILDER, "--device", "cpu"]
    assert main([*args, "--out", str(one)]) == 0
    dp = tmp_path / "dp"
    _torchrun([*args, "--out", str(dp), "--parallel", "data"], tmp_path)
    a = load_quantized(one / "target0.quant.safetensors", res_mlp())
    b = load_quantized(dp / "target0.quant.safetensors", res_mlp())
    la, lb = dict(quant_layers(a)), dict(quant_layers(b))
    same = sum(int((la[n].weight_integers() == lb[n].weight_integers()).sum()) for n in la)
    assert same >= 0.99 * sum(l.weight.numel() for l in la.values())
    for n in la:
        torch.testing.assert_close(la[n].act_quantizer.scale, lb[n].act_quantizer.scale, rtol=1e-4, atol=1e-6)
    x = torch.randn(6, 8)
    with torch.no_grad():
        torch.testing.assert_close(a(x), b(x), rtol=2e-2, atol=2e-3)


# ------------------------------------------------------------------------------------------------
# resume after kill -9
# ------------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_a_killed_run_resumes_and_writes_the_same_files(files, tmp_path):
    config = tmp_path / "long.json"
    config.write_text(json.dumps({"method": "hdrq", "iters": 80, "calib_batch_size": 4, "noise_mode": "uniform"}))
    args = ["calibrate", "--source", files["source"], "--targets", *files["targets"][:2], "--data",
            *files["data"][:2], "--config", str(config), "--builder", BUILDER, "--device", "cpu", "--merge",
            "average"]
    reference = tmp_path / "reference"
    assert main([*args, "--out", str(reference)]) == 0
    out = tmp_path / "killed"
    killed_at = None
    for kill_after in (2, 4):  # kill after the first target's 2nd, then the second target's 2nd block file
        proc = subprocess.Popen([sys.executable, "-m", "hdrq", *args, "--out", str(out)], cwd=tmp_path, env=_env(),
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + TIMEOUT
        ckpt = out / ".checkpoints"
        while time.monotonic() < deadline and proc.poll() is None:
            n = sum(len(files) for _, _, files in os.walk(ckpt)) if ckpt.exists() else 0
            if n >= kill_after:
                os.kill(proc.pid, signal.SIGKILL)
                killed_at = n
                break
            time.sleep(0.02)
        proc.wait(timeout=TIMEOUT)
        assert proc.returncode == -signal.SIGKILL, "the run finished before it could be killed"
    assert killed_at is not None and not (out / "merged.quant.safetensors").exists()
    r = subprocess.run([sys.executable, "-m", "hdrq", *args, "--out", str(out)], cwd=tmp_path, env=_env(),
                       capture_output=True, text=True, timeout=TIMEOUT)
    assert r.returncode == 0, r.stderr[-3000:]
    for n in ("target0", "target1", "merged"):
        assert _bytes(out / f"{n}.quant.safetensors") == _bytes(reference / f"{n}.quant.safetensors"), n
