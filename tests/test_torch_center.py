"""tripmine.torch.CenterLoss against a pure-torch autograd reference, both center rules."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")

import reference  # noqa: E402
from tripmine.torch import CenterLoss  # noqa: E402


def _torch_reference(x, labels, centers, reduction):
    per = 0.5 * ((x - centers[labels]) ** 2).sum(1)
    if reduction == "none":
        return per
    return per.mean() if reduction == "mean" else per.sum()


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_sgd_rule_matches_pure_torch_autograd(reduction):
    torch.manual_seed(0)
    module = CenterLoss(5, 4, update="sgd", reduction=reduction).double()
    with torch.no_grad():
        module.centers.normal_()
    x = torch.randn(13, 4, dtype=torch.float64, requires_grad=True)
    labels = torch.randint(0, 4, (13,))
    upstream = torch.rand(13, dtype=torch.float64) if reduction == "none" else torch.tensor(0.7)
    loss = module(x, labels)
    (loss * upstream).sum().backward()
    ours = (loss.detach(), x.grad.clone(), module.centers.grad.clone())
    x.grad = None
    module.centers.grad = None
    expected = _torch_reference(x, labels, module.centers, reduction)
    (expected * upstream).sum().backward()
    torch.testing.assert_close(ours[0], expected.detach(), rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(ours[1], x.grad, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(ours[2], module.centers.grad, rtol=1e-12, atol=1e-14)
    assert not ours[2][4].any()  # class 4 has no sample


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_gradcheck(reduction):
    from tripmine.torch.center import _CenterFunction
    x = torch.randn(7, 3, dtype=torch.float64, requires_grad=True)
    centers = torch.randn(4, 3, dtype=torch.float64, requires_grad=True)
    labels = torch.tensor([0, 1, 1, 2, 0, 3, 3])
    assert torch.autograd.gradcheck(
        lambda a, c: _CenterFunction.apply(a, c, labels, reduction), (x, centers))


@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_paper_rule_updates_the_buffer_after_the_loss(reduction):
    torch.manual_seed(1)
    module = CenterLoss(5, 4, alpha=0.5, reduction=reduction).double()
    assert "centers" in dict(module.named_buffers()) and not list(module.parameters())
    with torch.no_grad():
        module.centers.normal_()
    before = module.centers.clone()
    x = torch.randn(13, 4, dtype=torch.float64, requires_grad=True)
    labels = torch.randint(0, 4, (13,))
    loss = module(x, labels)
    expected = _torch_reference(x.detach(), labels, before, reduction)
    torch.testing.assert_close(loss.detach(), expected, rtol=1e-12, atol=1e-14)
    # The centers moved by the paper's rule, from the centers the loss used.
    updated = reference.update_centers(before.numpy(), x.detach().numpy(), labels.numpy(), 0.5)
    np.testing.assert_allclose(module.centers.numpy(), updated, rtol=1e-14)
    # The gradient is the one at the old centers, even after the update.
    upstream = torch.rand(13, dtype=torch.float64) if reduction == "none" else torch.tensor(1.0)
    (loss * upstream).sum().backward()
    xr = x.detach().clone().requires_grad_(True)
    (_torch_reference(xr, labels, before, reduction) * upstream).sum().backward()
    torch.testing.assert_close(x.grad, xr.grad, rtol=1e-12, atol=1e-14)


def test_eval_mode_freezes_the_centers():
    module = CenterLoss(3, 2).eval()
    before = module.centers.clone()
    module(torch.randn(6, 2), torch.tensor([0, 1, 2, 0, 1, 2]))
    assert torch.equal(module.centers, before)


def test_training_pulls_the_centers_to_the_class_means():
    torch.manual_seed(2)
    means = torch.randn(4, 8) * 3
    module = CenterLoss(4, 8, alpha=0.5)
    for _ in range(60):
        labels = torch.randint(0, 4, (32,))
        module(means[labels] + 0.01 * torch.randn(32, 8), labels)
    torch.testing.assert_close(module.centers, means, rtol=0, atol=0.05)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_computes_in_float32(dtype):
    module = CenterLoss(3, 4).to(dtype)
    x = torch.randn(6, 4).to(dtype).requires_grad_(True)
    loss = module(x, torch.tensor([0, 1, 2, 0, 1, 2]))
    loss.backward()
    assert loss.dtype == torch.float32 and x.grad.dtype == dtype
    assert module.centers.dtype == dtype and module.centers.any()


def test_bad_arguments():
    with pytest.raises(ValueError, match="update"):
        CenterLoss(3, 2, update="adam")
    with pytest.raises(ValueError, match="alpha"):
        CenterLoss(3, 2, alpha=-1.0)
    with pytest.raises(ValueError, match="num_classes"):
        CenterLoss(0, 2)
    module = CenterLoss(3, 2)
    with pytest.raises(ValueError, match="x must be"):
        module(torch.randn(4, 3), torch.zeros(4, dtype=torch.int64))
    with pytest.raises(ValueError, match="labels"):
        module(torch.randn(4, 2), torch.tensor([0, 1, 3, 0]))
    assert not module.centers.any()  # a refused call moves nothing


def test_cuda_equals_cpu():
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    pytest.importorskip("cupy", reason="the GPU path needs CuPy")
    torch.manual_seed(3)
    x = torch.randn(40, 8, dtype=torch.float64)
    labels = torch.randint(0, 6, (40,))
    results = []
    for device in ("cpu", "cuda"):
        module = CenterLoss(6, 8).double().to(device)
        xv = x.to(device).requires_grad_(True)
        module(xv, labels.to(device)).backward()
        results.append((xv.grad.cpu(), module.centers.cpu()))
    torch.testing.assert_close(results[1][0], results[0][0], rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(results[1][1], results[0][1], rtol=1e-12, atol=1e-14)
