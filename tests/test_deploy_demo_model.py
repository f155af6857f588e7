"""The benchmark's model end to end through deployment: a merged W6A6 SmallResNet (examples.mtda), converted to
real int6 layers, keeps the accuracy of its fake-quant version (within 0.5 points) on every target, on CPU and
on the GPU."""
import pytest
import torch

import hdrq
from examples.mtda.model import SmallResNet, evaluate, train_source
from examples.mtda.synthetic import make_digits_domains


def _merged_w6a6(device):
    torch.manual_seed(0)
    suite = make_digits_domains(image_size=16, seed=0, max_images=700)
    model = SmallResNet(suite.in_channels, suite.num_classes, widths=(8, 16)).to(device)
    source = train_source(model, suite.source, epochs=10, lr=1e-2, batch_size=64, seed=0, device=device)
    # Two W6A6 models calibrated on two target domains (HDRQ, a short schedule), merged by the HDRQ merge.
    cfg = dict(method="hdrq", w_bits=6, a_bits=6, iters=10, seed=0, device=str(device), verbose=False)
    quantized = [hdrq.quantize(source, d.x_train[:32].to(device), hdrq.QuantConfig(**cfg), source=source)
                 for d in suite.targets[:2]]
    merged = hdrq.merge(quantized, method="hdrq", seed=0, candidates=20).eval()
    return suite, merged


def _check(device):
    suite, merged = _merged_w6a6(device)
    deployed = hdrq.convert(merged, verbose=False)
    assert any(isinstance(m, hdrq.nn.QConv2d) for m in deployed.modules())
    with torch.no_grad():
        for d in [suite.source, *suite.targets]:
            fake = evaluate(merged, d.x_test, d.y_test, device=device)
            real = evaluate(deployed, d.x_test, d.y_test, device=device)
            assert abs(fake - real) <= 0.005, (d.name, fake, real)
        # a model that learned something, so the comparison means something
        assert evaluate(merged, suite.source.x_test, suite.source.y_test, device=device) > 0.5


def test_converted_demo_model_keeps_accuracy_cpu():
    _check(torch.device("cpu"))


@pytest.mark.cuda
def test_converted_demo_model_keeps_accuracy_gpu():
    _check(torch.device("cuda"))
