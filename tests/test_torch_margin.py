"""tripmine.torch.MarginLoss against a pure-torch autograd reference on the same triplets."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from tripmine.torch import MarginLoss  # noqa: E402


def _reference(x, labels, beta, triplets, *, margin, nu, reduction, per_class, normalize):
    rows = torch.nn.functional.normalize(x, dim=1) if normalize else x
    a, p, q = (torch.as_tensor(np.asarray(t)) for t in triplets)
    b = beta[labels[a]] if per_class else beta.reshape(()).expand(a.shape[0])
    pos = torch.relu((rows[a] - rows[p]).norm(dim=1) - b + margin)
    neg = torch.relu(b - (rows[a] - rows[q]).norm(dim=1) + margin)
    terms = pos + neg + nu * b
    if reduction == "none":
        return terms
    if reduction == "sum":
        return terms.sum()
    active = int((pos > 0).sum() + (neg > 0).sum())
    return terms.sum() / active if active else terms.sum() * 0


@pytest.mark.parametrize("per_class", [False, True])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("mining", ["distance_weighted", "batch_hard"])
def test_matches_pure_torch_autograd(per_class, reduction, mining):
    torch.manual_seed(0)
    module = MarginLoss(num_classes=8 if per_class else None, nu=0.05, mining=mining,
                        reduction=reduction, seed=3).double()
    with torch.no_grad():
        module.beta.uniform_(0.8, 1.4)
    x = torch.randn(32, 6, dtype=torch.float64, requires_grad=True)
    labels = torch.arange(32) // 4
    loss = module(x, labels)
    upstream = torch.rand(loss.shape, dtype=torch.float64) if loss.dim() else torch.tensor(0.7)
    (loss * upstream).sum().backward()
    ours = (loss.detach(), x.grad.clone(), module.beta.grad.clone())
    # the same triplets, from tripmine's own miner with the call's seed
    import tripmine
    unit = torch.nn.functional.normalize(x.detach(), dim=1).numpy()
    triplets = (tripmine.distance_weighted(unit, labels.numpy(), seed=3) if mining ==
                "distance_weighted" else tripmine.batch_hard(unit, labels.numpy()))
    assert module.n_triplets == len(triplets.anchor)
    x.grad = None
    module.beta.grad = None
    expected = _reference(x, labels, module.beta, triplets, margin=0.2, nu=0.05,
                          reduction=reduction, per_class=per_class, normalize=True)
    (expected * upstream).sum().backward()
    torch.testing.assert_close(ours[0], expected.detach(), rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(ours[1], x.grad, rtol=1e-8, atol=1e-11)
    torch.testing.assert_close(ours[2], module.beta.grad, rtol=1e-8, atol=1e-11)


def test_beta_trains_and_can_be_frozen():
    torch.manual_seed(1)
    module = MarginLoss(num_classes=4, beta=1.2, seed=0)
    optimiser = torch.optim.SGD(module.parameters(), lr=0.5)
    x = torch.randn(16, 5)
    labels = torch.arange(16) // 4
    before = module.beta.detach().clone()
    module(x, labels).backward()
    optimiser.step()
    assert not torch.equal(module.beta.detach(), before)
    frozen = MarginLoss(learn_beta=False)
    assert not list(frozen.parameters()) and "beta" in dict(frozen.named_buffers())


def test_bad_options():
    with pytest.raises(ValueError, match="margin"):
        MarginLoss(margin=-1.0)
    with pytest.raises(ValueError, match="mining"):
        MarginLoss(mining="hardest")
    with pytest.raises(ValueError, match="num_classes"):
        MarginLoss(num_classes=0)
    module = MarginLoss(num_classes=2, seed=0)
    with pytest.raises(ValueError, match="labels"):
        module(torch.randn(8, 3), torch.arange(8) // 2)  # labels up to 3, two betas


@pytest.mark.parametrize("per_class", [False, True])
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_batch_all_matches_pure_torch_autograd_over_every_triplet(per_class, reduction):
    import reference
    torch.manual_seed(1)
    module = MarginLoss(num_classes=4 if per_class else None, nu=0.05, mining="batch_all",
                        reduction=reduction).double()
    with torch.no_grad():
        module.beta.uniform_(0.8, 1.4)
    x = torch.randn(16, 5, dtype=torch.float64, requires_grad=True)
    labels = torch.arange(16) // 4
    loss = module(x, labels)
    (0.7 * loss).backward()
    xr = x.detach().clone().requires_grad_(True)
    br = module.beta.detach().clone().requires_grad_(True)
    triplets = reference.batch_all_triplets(list(labels.numpy()))
    want = _reference(xr, labels, br, triplets, margin=0.2, nu=0.05, reduction=reduction,
                      per_class=per_class, normalize=True)
    (0.7 * want).backward()
    assert module.n_triplets == len(triplets[0])
    torch.testing.assert_close(loss.detach(), want.detach())
    torch.testing.assert_close(x.grad, xr.grad)
    torch.testing.assert_close(module.beta.grad, br.grad.to(module.beta.dtype))


def test_batch_all_none_backpropagates_only_a_uniform_gradient():
    module = MarginLoss(mining="batch_all", reduction="none").double()
    x = torch.randn(12, 4, dtype=torch.float64, requires_grad=True)
    loss = module(x, torch.arange(12) // 3)
    assert loss.shape == (12,)
    loss.sum().backward()
    assert torch.isfinite(x.grad).all()
    with pytest.raises(NotImplementedError, match="uniform"):
        module(x, torch.arange(12) // 3).backward(torch.rand(12, dtype=torch.float64))
