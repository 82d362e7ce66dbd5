"""tripmine.torch's margin-softmax modules against pure-torch autograd references."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from test_heads import HEADS, _problem, _ref_params  # noqa: E402
from test_heads import IDS as HEAD_IDS  # noqa: E402

import torch_reference  # noqa: E402
from tripmine import heads as tm_heads  # noqa: E402
from tripmine.torch import (  # noqa: E402
    ArcFace,
    CombinedMargin,
    CosFace,
    LargeMarginSoftmax,
    NormFace,
    SoftmaxLoss,
    SphereFace,
)

MODULES = [
    (SoftmaxLoss, "softmax", {}),
    (NormFace, "normface", {"scale": 5.0}),
    (CosFace, "cosface", {"scale": 5.0, "margin": 0.3}),
    (ArcFace, "arcface", {"scale": 5.0, "margin": 0.4}),
    (ArcFace, "arcface", {"scale": 5.0, "margin": 0.4, "straight_through": True}),
    (CombinedMargin, "combined", {"scale": 5.0, "m1": 1.1, "m2": 0.2, "m3": 0.1}),
    (SphereFace, "sphereface", {"margin": 3, "lambda_": 1.0}),
    (LargeMarginSoftmax, "lsoftmax", {"margin": 2, "lambda_": 0.5}),
]
IDS = [f"{cls.__name__}-{i}" for i, (cls, _, _) in enumerate(MODULES)]

_DEFAULTS = {"normface": {"scale": 20.0}, "cosface": {"scale": 64.0, "margin": 0.35},
             "arcface": {"scale": 64.0, "margin": 0.5},
             "combined": {"scale": 64.0, "m1": 1.0, "m2": 0.3, "m3": 0.2},
             "sphereface": {"margin": 4}, "lsoftmax": {"margin": 4}}


def _reference(kind, module, x, labels, reduction):
    bias = getattr(module, "bias", None) if kind == "softmax" else None
    params = dict(_DEFAULTS.get(kind, {}), **module.options)
    cw = module.class_weight
    return torch_reference.head_reference(kind, x, labels, module.weight, bias=bias,
                                          class_weight=cw, reduction=reduction, **params)


@pytest.mark.parametrize("cls, kind, options", MODULES, ids=IDS)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_module_matches_pure_torch_autograd(cls, kind, options, reduction):
    torch.manual_seed(0)
    cw = torch.rand(13, dtype=torch.float64) + 0.5
    module = cls(13, 6, class_weight=cw, reduction=reduction, **options).double()
    with torch.no_grad():  # spread W out so that the logits are not all alike
        module.weight.mul_(30 if kind != "softmax" else 1)
    x = torch.randn(17, 6, dtype=torch.float64, requires_grad=True)
    labels = torch.randint(0, 13, (17,))
    loss = module(x, labels)
    upstream = torch.rand(17, dtype=torch.float64) if reduction == "none" else torch.tensor(0.7)
    (loss * upstream).sum().backward()
    ours = (loss.detach(), x.grad.clone(), module.weight.grad.clone())
    x.grad = None
    module.weight.grad = None
    if kind == "softmax":
        bias_grad = module.bias.grad.clone()
        module.bias.grad = None
    expected = _reference(kind, module, x, labels, reduction)
    (expected * upstream).sum().backward()
    torch.testing.assert_close(ours[0], expected.detach(), rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(ours[1], x.grad, rtol=1e-8, atol=1e-11)
    torch.testing.assert_close(ours[2], module.weight.grad, rtol=1e-8, atol=1e-11)
    if kind == "softmax":
        torch.testing.assert_close(bias_grad, module.bias.grad, rtol=1e-8, atol=1e-11)
    assert 0 <= module.n_correct <= 17 and module.accuracy == module.n_correct / 17


@pytest.mark.parametrize("cls, kind, options", MODULES[:4], ids=IDS[:4])
def test_gradcheck(cls, kind, options):
    torch.manual_seed(1)
    module = cls(7, 4, **options).double()
    x = torch.randn(5, 4, dtype=torch.float64, requires_grad=True)
    labels = torch.randint(0, 7, (5,))

    def f(xx, ww):
        module.weight.data = ww.detach()
        from tripmine.torch.heads import _HeadFunction
        return _HeadFunction.apply(xx, ww, module._bias(), labels.numpy(), module)

    w = (module.weight.detach() * 20).requires_grad_(True)
    assert torch.autograd.gradcheck(f, (x, w), eps=1e-6, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_computes_in_float32(dtype):
    torch.manual_seed(2)
    module = ArcFace(11, 8, scale=8.0)
    x = torch.randn(9, 8).to(dtype).requires_grad_(True)
    labels = torch.randint(0, 11, (9,))
    loss = module(x, labels)
    assert loss.dtype == torch.float32
    loss.backward()
    assert x.grad.dtype == dtype and module.weight.grad.dtype == torch.float32
    reference = ArcFace(11, 8, scale=8.0)
    reference.load_state_dict(module.state_dict())
    assert reference(x.detach().float(), labels).item() == loss.detach().item()


def test_modules_own_and_train_their_weight():
    torch.manual_seed(3)
    module = CosFace(5, 3, scale=10.0)
    assert isinstance(module.weight, torch.nn.Parameter) and module.weight.shape == (5, 3)
    assert [name for name, _ in module.named_parameters()] == ["weight"]
    softmax = SoftmaxLoss(5, 3)
    assert [name for name, _ in softmax.named_parameters()] == ["weight", "bias"]
    assert SoftmaxLoss(5, 3, bias=False).bias is None
    x = torch.randn(40, 3)
    labels = torch.randint(0, 5, (40,))
    optimizer = torch.optim.SGD(list(module.parameters()), lr=0.5)
    first = module(x, labels).item()
    for _ in range(30):
        optimizer.zero_grad()
        module(x, labels).backward()
        optimizer.step()
    assert module(x, labels).item() < first
    assert "num_classes=5" in repr(module)


def test_no_grad_skips_the_gradients():
    module = NormFace(4, 3)
    with torch.no_grad():
        loss = module(torch.randn(6, 3), torch.randint(0, 4, (6,)))
    assert loss.requires_grad is False


@pytest.mark.parametrize("make", [
    lambda: ArcFace(10, 4, margin=float("nan")),
    lambda: SphereFace(10, 4, margin=2.5),
    lambda: CosFace(0, 4),
    lambda: NormFace(10, 4, reduction="mean_nonzero"),
    lambda: SoftmaxLoss(3, 2, class_weight=[1.0, -1.0, 1.0]),
])
def test_bad_options_fail_at_construction(make):
    with pytest.raises(ValueError):
        make()


def test_wrong_input_shape_and_labels():
    module = CosFace(6, 4)
    with pytest.raises(ValueError, match="x must be"):
        module(torch.randn(3, 5), torch.zeros(3, dtype=torch.int64))
    with pytest.raises(ValueError, match="labels"):
        module(torch.randn(3, 4), torch.tensor([0, 1, 6]))


def test_double_backward_fails_loudly():
    module = CosFace(6, 4)
    x = torch.randn(5, 4, requires_grad=True)
    loss = module(x, torch.randint(0, 6, (5,)))
    (g,) = torch.autograd.grad(loss, x, create_graph=True)
    with pytest.raises(RuntimeError, match="differentiable once"):
        g.sum().backward()


def test_class_weight_is_a_buffer_that_follows_the_module():
    module = SoftmaxLoss(3, 2, class_weight=np.array([1.0, 2.0, 0.5]))
    assert "class_weight" in dict(module.named_buffers())
    assert "class_weight" in module.state_dict()


# ---- devices ------------------------------------------------------------------------

def test_a_module_on_another_device_than_x_is_refused():
    module = CosFace(6, 4).to("meta")
    with pytest.raises(ValueError, match="module.to"):
        module(torch.randn(3, 4), torch.zeros(3, dtype=torch.int64))


def test_devices_other_than_cpu_and_cuda_are_refused():
    module = CosFace(6, 4).to("meta")
    with pytest.raises(TypeError, match="CPU or CUDA"):
        module(torch.zeros(3, 4, device="meta"), torch.zeros(3, dtype=torch.int64))


def _cuda_ready():
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    pytest.importorskip("cupy", reason="the GPU path needs CuPy")


@pytest.mark.parametrize("cls, kind, options", MODULES, ids=IDS)
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_cuda_modules_equal_the_cpu_ones(cls, kind, options, reduction):
    """A module moved to the GPU runs the CuPy path; loss and every gradient equal the CPU's
    (float64, so the two summation orders agree to rounding)."""
    _cuda_ready()
    torch.manual_seed(1)
    cw = torch.rand(13, dtype=torch.float64) + 0.5
    cpu = cls(13, 6, class_weight=cw, reduction=reduction, **options).double()
    with torch.no_grad():
        cpu.weight.mul_(30 if kind != "softmax" else 1)
    gpu = cls(13, 6, class_weight=cw, reduction=reduction, **options).double()
    gpu.load_state_dict(cpu.state_dict())
    gpu = gpu.cuda()
    x = torch.randn(17, 6, dtype=torch.float64)
    labels = torch.randint(0, 13, (17,))
    upstream = torch.rand(17, dtype=torch.float64) if reduction == "none" else torch.tensor(0.7)
    results = []
    for module, device in ((cpu, "cpu"), (gpu, "cuda")):
        xv = x.to(device).requires_grad_(True)
        loss = module(xv, labels.to(device))
        assert loss.device.type == device
        (loss * upstream.to(device)).sum().backward()
        params = [p.grad.cpu() for p in module.parameters()]
        results.append((loss.detach().cpu(), xv.grad.cpu(), params, module.n_correct))
    (l0, g0, p0, c0), (l1, g1, p1, c1) = results
    torch.testing.assert_close(l1, l0, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(g1, g0, rtol=1e-8, atol=1e-11)
    for a, b in zip(p1, p0):
        torch.testing.assert_close(a, b, rtol=1e-8, atol=1e-11)
    assert c1 == c0


def test_cuda_half_precision_trains():
    _cuda_ready()
    module = ArcFace(50, 16).cuda()
    optimiser = torch.optim.SGD(module.parameters(), lr=0.1)
    x = torch.randn(64, 16, device="cuda").half().requires_grad_(True)
    labels = torch.randint(0, 50, (64,), device="cuda")
    loss = module(x, labels)
    loss.backward()
    optimiser.step()
    assert loss.dtype == torch.float32 and x.grad.dtype == torch.float16
    assert torch.isfinite(x.grad).all() and torch.isfinite(module.weight).all()


# ---- pure-torch autograd ------------------------------------------------------------

@pytest.mark.parametrize("kind, fn, kw", HEADS + [
    ("arcface", tm_heads.arcface_loss, {"scale": 4.0, "margin": 0.5, "straight_through": True}),
    ("combined", tm_heads.combined_margin_loss,
     {"scale": 4.0, "m1": 1.2, "m2": 0.3, "m3": 0.2, "straight_through": True}),
], ids=HEAD_IDS + ["arcface-straight_through", "combined-straight_through"])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_matches_pure_torch_autograd(kind, fn, kw, reduction):
    rng = np.random.default_rng(13)
    x, labels, w = _problem(rng, 19, 23, 7)
    cw = rng.uniform(0.3, 1.7, 23)
    result = fn(x, labels, w, class_weight=cw, reduction=reduction, **kw)
    xt = torch.tensor(x, requires_grad=True)
    wt = torch.tensor(w, requires_grad=True)
    loss = torch_reference.head_reference(kind, xt, torch.tensor(labels), wt,
                                          class_weight=torch.tensor(cw), reduction=reduction,
                                          **_ref_params(kw))
    loss.sum().backward()
    np.testing.assert_allclose(result.loss, loss.detach().numpy(), rtol=1e-11)
    np.testing.assert_allclose(result.grad, xt.grad.numpy(), rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(result.weight_grad, wt.grad.numpy(), rtol=1e-9, atol=1e-12)
