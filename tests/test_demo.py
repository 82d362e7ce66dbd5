"""The demo (``python -m tripmine demo``) and the examples in ``examples/``.

The training loop, the hand-written MLP and Adam need only NumPy and tripmine,
so they are tested on synthetic clusters everywhere; the full pipeline on the
digits (data from scikit-learn, PNG from matplotlib) and the PyTorch example
skip when their optional packages are missing.  The full-length demo is run by
CI, not here.
"""

from __future__ import annotations

import argparse
import importlib.util
import io
import json
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import tripmine
from tripmine import demo
from tripmine.__main__ import _add_demo_parser, main

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def clusters(n_classes: int = 6, per_class: int = 24, dim: int = 16, seed: int = 0):
    """Gaussian clusters that overlap: an untrained network has plenty of active triplets."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((n_classes, dim))
    labels = np.repeat(np.arange(n_classes), per_class)
    x = centres[labels] + 0.7 * rng.standard_normal((labels.shape[0], dim))
    return x.astype(np.float32), labels


def load_example(name: str):
    spec = importlib.util.spec_from_file_location(f"tripmine_example_{name}",
                                                  EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def assert_valid_png(path: Path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == PNG_SIGNATURE
    length, chunk = struct.unpack(">I4s", data[8:16])
    assert chunk == b"IHDR" and length == 13
    width, height = struct.unpack(">II", data[16:24])
    assert data[-12:] == b"\x00\x00\x00\x00IEND\xaeB`\x82"
    return width, height


# --------------------------------------------------------------------------- the model


@pytest.mark.parametrize("hidden", [(), (7,), (9, 5)])
def test_mlp_gradient_matches_finite_differences(hidden):
    rng = np.random.default_rng(1)
    model = demo.MLP((5, *hidden, 4), seed=2, dtype=np.float64)
    for param in model.params[1::2]:  # non-zero biases, so they are exercised too
        param += 0.1 * rng.standard_normal(param.shape)
    x = rng.standard_normal((11, 5))
    weights = rng.standard_normal((11, 4))  # L = sum(weights * output): any dL/doutput

    def loss() -> float:
        return float(np.sum(weights * model.forward(x)[0]))

    out, cache = model.forward(x)
    np.testing.assert_allclose(np.linalg.norm(out, axis=1), 1.0, rtol=1e-12)
    grads = model.backward(cache, weights)
    eps = 1e-6
    for param, grad in zip(model.params, grads):
        assert grad.shape == param.shape
        for _ in range(3):  # central differences along random directions
            direction = rng.standard_normal(param.shape)
            saved = param.copy()
            param += eps * direction
            up = loss()
            param[...] = saved - eps * direction
            down = loss()
            param[...] = saved
            numeric = (up - down) / (2 * eps)
            assert np.sum(grad * direction) == pytest.approx(numeric, rel=1e-6, abs=1e-8)


@pytest.mark.parametrize("loss", ["triplet", "contrastive", "lifted", "arcface", "softmax",
                                  "sphereface", "center", "margin"])
def test_network_and_loss_gradient_chain(loss):
    """dL/dparams through tripmine's loss (and a head's class weights), against central
    differences (float64)."""
    x, labels = clusters(n_classes=4, per_class=5, dim=6, seed=3)
    x = x.astype(np.float64)
    model = demo.MLP((6, 8, 5), seed=4, dtype=np.float64)
    head = loss in demo.HEAD_LOSSES or loss in ("center", "margin")
    config = demo.DemoConfig(loss=loss, mining="batch_all", margin=0.5 if not head else None)
    weight = np.random.default_rng(6).standard_normal((4, 5)) if head else None
    if loss == "margin":  # one beta per class, around the distances of unit rows
        weight = np.random.default_rng(6).uniform(0.8, 1.6, (4, 1))
    centers = np.random.default_rng(7).standard_normal((4, 5)) if loss == "center" else None
    labels = np.searchsorted(np.unique(labels), labels) if head else labels

    def value() -> float:
        return demo.loss_and_grad(config, model.forward(x)[0], labels, 0, weight, centers)[0]

    out, cache = model.forward(x)
    _, grad_out, _, weight_grad = demo.loss_and_grad(config, out, labels, 0, weight, centers)
    grads = model.backward(cache, grad_out)
    assert (weight_grad is not None) == head
    rng = np.random.default_rng(5)
    eps = 1e-6
    for param, grad in zip(model.params + ([weight] if head else []),
                           grads + ([weight_grad] if head else [])):
        direction = rng.standard_normal(param.shape)
        saved = param.copy()
        param += eps * direction
        up = value()
        param[...] = saved - eps * direction
        down = value()
        param[...] = saved
        assert np.sum(grad * direction) == pytest.approx((up - down) / (2 * eps),
                                                         rel=1e-5, abs=1e-8)


def test_zero_output_row_gives_zero_gradient():
    model = demo.MLP((3, 2), seed=0, dtype=np.float64)
    model.params[0][...] = 0.0
    out, cache = model.forward(np.ones((2, 3)))
    assert np.all(np.isfinite(out))
    grads = model.backward(cache, np.ones((2, 2)))
    assert all(np.all(g == 0) for g in grads)


def test_adam_first_step_is_lr_times_sign():
    param = np.array([1.0, -2.0, 3.0])
    optimizer = demo.Adam([param], lr=0.1)
    optimizer.step([np.array([0.5, -4.0, 0.0])])
    np.testing.assert_allclose(param, [0.9, -1.9, 3.0], atol=1e-6)


# --------------------------------------------------------------------------- training


@pytest.mark.parametrize("loss, mining", [("triplet", "batch_hard"), ("triplet", "batch_all"),
                                          ("triplet", "semi_hard"),
                                          ("triplet", "distance_weighted"),
                                          ("contrastive", "batch_hard"),
                                          ("lifted", "batch_hard"),
                                          ("arcface", "batch_hard"), ("softmax", "batch_hard"),
                                          ("lsoftmax", "batch_hard"), ("center", "batch_hard"),
                                          ("margin", "batch_hard")])
def test_training_loop_decreases_loss(loss, mining):
    x, labels = clusters()
    config = demo.DemoConfig(loss=loss, mining=mining, steps=60, p=4, k=8, lr=1e-2,
                             hidden=(32,), dim=8, seed=0)
    model = demo.MLP((x.shape[1], 32, 8), seed=0)
    seen = []
    history = demo.train(model, x, labels, config,
                         callback=lambda step, value, active: seen.append(step))
    assert seen == list(range(1, 61))
    assert len(history.loss) == len(history.fraction_active) == 60
    assert np.all(np.isfinite(history.loss))
    assert all(0.0 <= f <= 1.0 for f in history.fraction_active)
    # A head's logits on unit-norm embeddings are bounded by its class weights, which start
    # small and grow with training: its loss falls more slowly in 60 steps.
    # Song's lifted term on unit rows keeps log(sum over ~2 x 24 negatives) >= log(48) - 1
    # inside its square, a floor of about 4: it falls by less too.
    factor = 0.8 if loss in demo.HEAD_LOSSES or loss in ("center", "margin", "lifted") else 0.6
    assert np.mean(history.loss[-10:]) < factor * np.mean(history.loss[:10])


def test_training_is_reproducible():
    x, labels = clusters()
    config = demo.DemoConfig(mining="distance_weighted", steps=20, p=4, k=8, dim=8, seed=7)
    runs = []
    for _ in range(2):
        model = demo.MLP((x.shape[1], 16, 8), seed=7)
        history = demo.train(model, x, labels, config)
        runs.append((history.loss, model.params))
    assert runs[0][0] == runs[1][0]
    for a, b in zip(runs[0][1], runs[1][1]):
        np.testing.assert_array_equal(a, b)


def test_training_refuses_too_many_classes_per_batch():
    x, labels = clusters(n_classes=3)
    with pytest.raises(ValueError, match="only 3 classes"):
        demo.train(demo.MLP((16, 4)), x, labels, demo.DemoConfig(p=5, steps=1))


@pytest.mark.parametrize("field, value, match", [
    ("loss", "hinge", "loss must be"), ("mining", "hardest", "mining must be"),
    ("k", 1, "k must be >= 2"), ("p", 1, "p must be >= 2"), ("lr", 0.0, "lr must be"),
    ("margin", -0.1, "margin must be"), ("test_fraction", 1.0, "test_fraction"),
    ("projection", "umap", "projection"), ("steps", 0, "steps must be"),
])
def test_config_refuses_bad_settings(field, value, match):
    with pytest.raises(ValueError, match=match):
        demo.DemoConfig(**{field: value}).check()


def test_import_leaves_optional_packages_alone():
    code = ("import sys, tripmine.demo, tripmine.__main__; "
            "print(sorted(m for m in ('sklearn', 'matplotlib', 'tqdm', 'torch') "
            "if m in sys.modules))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            check=True)
    assert result.stdout.strip() == "[]"


# --------------------------------------------------------------------------- the whole demo


def test_missing_dependency_names_the_extra(monkeypatch, capsys):
    for name in ("sklearn", "sklearn.datasets"):
        monkeypatch.setitem(sys.modules, name, None)  # makes "import sklearn" fail
    with pytest.raises(demo.MissingDependencyError, match=r"pip install 'tripmine\[demo\]'"):
        demo.run(demo.DemoConfig(steps=1), plot=None, progress=False, out=io.StringIO())
    assert main(["demo", "--steps", "1", "--no-plot", "--no-progress"]) == 1
    err = capsys.readouterr().err
    assert "scikit-learn" in err and "tripmine[demo]" in err


def test_cli_help_documents_every_option(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["demo", "--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    for option in ("--seed", "--epochs", "--steps", "--mining", "--loss", "--margin", "--p",
                   "--k", "--lr", "--dim", "--hidden", "--open-set", "--plot", "--json",
                   "--no-progress", "--threads"):
        assert option in text
    demo_parser = _add_demo_parser(argparse.ArgumentParser().add_subparsers())
    for action in demo_parser._actions:
        assert action.help, f"{action.option_strings} has no help text"


def test_cli_rejects_bad_options(capsys):
    with pytest.raises(SystemExit):
        main(["demo", "--k", "1"])
    assert "k must be >= 2" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["demo", "--hidden", "64,x"])


def test_demo_on_digits_writes_png_and_json(tmp_path, threads):
    pytest.importorskip("sklearn", reason="the demo's data needs scikit-learn (demo extra)")
    pytest.importorskip("matplotlib", reason="the demo's plot needs matplotlib (demo extra)")
    before = tripmine.get_num_threads()
    plot, report_path = tmp_path / "demo.png", tmp_path / "demo.json"
    out = io.StringIO()
    report = demo.run(demo.DemoConfig(steps=40, projection="pca", seed=3), plot=plot,
                      json_path=report_path, progress=False, threads=1, out=out)
    assert tripmine.get_num_threads() == before  # restored
    width, height = assert_valid_png(plot)
    assert width > 600 and height > 200
    on_disk = json.loads(report_path.read_text())
    assert on_disk == json.loads(json.dumps(report))
    assert set(on_disk["embeddings"]) == {"raw_pixels", "untrained", "trained"}
    for scores in on_disk["embeddings"].values():
        assert set(scores) >= {"recall_at_1", "map_at_r"}
        assert 0.0 <= scores["recall_at_1"] <= 1.0 and 0.0 <= scores["map_at_r"] <= 1.0
    assert on_disk["seconds"] > 0 and on_disk["steps"] == 40
    assert on_disk["final_loss"] < on_disk["initial_loss"]
    assert on_disk["n_train"] + on_disk["n_test"] == 1797
    # Even 40 steps beat the untrained network by far on MAP@R.
    embeddings = on_disk["embeddings"]
    assert embeddings["trained"]["map_at_r"] > embeddings["untrained"]["map_at_r"] + 0.2
    text = out.getvalue()
    assert "raw pixels" in text and "trained network" in text and "MAP@R" in text


def test_demo_command_line_open_set(tmp_path, capsys):
    pytest.importorskip("sklearn", reason="the demo's data needs scikit-learn (demo extra)")
    report_path = tmp_path / "open.json"
    assert main(["demo", "--open-set", "--steps", "5", "--no-plot", "--no-progress",
                 "--json", str(report_path)]) == 0
    report = json.loads(report_path.read_text())
    assert report["protocol"] == "open-set"
    assert set(report["train_classes"]).isdisjoint(report["test_classes"])
    assert report["config"]["p"] == len(report["train_classes"])
    assert "open set" in capsys.readouterr().out


@pytest.mark.parametrize("head", sorted(demo.HEAD_LOSSES) + ["center", "margin", "lifted"])
def test_demo_trains_with_every_head(tmp_path, head):
    """``python -m tripmine demo --loss <head>``: the network and the head's class weights
    train together and the held-out embeddings improve."""
    pytest.importorskip("sklearn", reason="the demo's data needs scikit-learn (demo extra)")
    report_path = tmp_path / "head.json"
    assert main(["demo", "--loss", head, "--steps", "60", "--no-plot", "--no-progress",
                 "--json", str(report_path)]) == 0
    report = json.loads(report_path.read_text())
    scores = report["embeddings"]
    assert scores["trained"]["map_at_r"] > scores["untrained"]["map_at_r"] + 0.2
    assert report["final_loss"] < report["initial_loss"]
    if head in ("margin", "lifted"):  # the share of active terms, which falls as it learns
        assert 0.0 <= report["final_fraction_active"] <= 1.0
    else:
        assert 0.5 < report["final_fraction_active"] <= 1.0  # the training accuracy


def test_digits_split_is_stratified_and_seeded():
    pytest.importorskip("sklearn", reason="the digits come from scikit-learn (demo extra)")
    a = demo.load_digits_split(0)
    b = demo.load_digits_split(0)
    c = demo.load_digits_split(1)
    np.testing.assert_array_equal(a.y_test, b.y_test)
    np.testing.assert_array_equal(a.x_test, b.x_test)
    assert not np.array_equal(a.x_test, c.x_test)
    train_counts, test_counts = np.bincount(a.y_train), np.bincount(a.y_test)
    assert np.all(np.abs(train_counts - test_counts) <= 1)


# --------------------------------------------------------------------------- examples


def test_numpy_example_trains():
    example = load_example("numpy_trainer")
    x, labels = clusters()
    params, losses = example.train(x, labels, steps=40, p=4, k=8, lr=1e-2, hidden=32, dim=8,
                                   log_every=0)
    assert len(losses) == 40 and np.all(np.isfinite(losses))
    assert np.mean(losses[-10:]) < 0.6 * np.mean(losses[:10])
    out, _ = example.embed(params, x)
    assert out.shape == (x.shape[0], 8)


def test_numpy_example_main_on_digits(threads, capsys):
    pytest.importorskip("sklearn", reason="the example's data needs scikit-learn")
    result = load_example("numpy_trainer").main(["--steps", "30"])
    assert 0.0 <= result["map_at_r"] <= 1.0
    assert "MAP@R trained network" in capsys.readouterr().out


@pytest.fixture
def torch_example():
    torch = pytest.importorskip("torch", reason="the PyTorch example needs torch")
    previous = torch.get_num_threads()
    yield torch, load_example("torch_autograd")
    torch.set_num_threads(previous)


@pytest.mark.parametrize("mining", ["batch_hard", "batch_all", "semi_hard", "distance_weighted"])
@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_torch_function_gradient_is_tripmines(torch_example, mining, dtype):
    torch, example = torch_example
    x_np, labels_np = clusters(n_classes=4, per_class=6, dim=5, seed=11)
    x_np = x_np.astype(dtype)
    x = torch.tensor(x_np, requires_grad=True)
    labels = torch.from_numpy(labels_np)
    loss = example.triplet_loss(x, labels, mining=mining, margin=0.3, seed=5)
    (3.0 * loss).backward()  # the incoming gradient scales tripmine's
    expected = tripmine.triplet_loss(x_np, labels_np, mining=mining, margin=0.3,
                                     normalize=True, seed=5)
    assert loss.dtype == x.dtype and loss.item() == pytest.approx(expected.loss, rel=1e-6)
    np.testing.assert_allclose(x.grad.numpy(), 3.0 * expected.grad, rtol=1e-6, atol=1e-7)


def test_torch_function_passes_gradcheck(torch_example):
    torch, example = torch_example
    x_np, labels_np = clusters(n_classes=3, per_class=4, dim=4, seed=12)
    x = torch.tensor(x_np.astype(np.float64), requires_grad=True)
    labels = torch.from_numpy(labels_np)
    assert torch.autograd.gradcheck(
        lambda e: example.triplet_loss(e, labels, mining="batch_all", margin=0.5), (x,),
        eps=1e-6, atol=1e-6)
    # Through a layer in front, as in training.
    layer = torch.nn.Linear(4, 3).double()
    loss = example.triplet_loss(layer(x), labels, margin=0.5)
    loss.backward()
    assert layer.weight.grad is not None and torch.isfinite(layer.weight.grad).all()


def test_torch_example_main_on_digits(torch_example, threads, capsys):
    pytest.importorskip("sklearn", reason="the example's data needs scikit-learn")
    _, example = torch_example
    result = example.main(["--steps", "20"])
    assert 0.0 <= result["map_at_r"] <= 1.0
    assert "MAP@R" in capsys.readouterr().out
