"""examples/train_torch.py: a short run trains (Recall@1 of the seen digits' held-out
images rises above the untrained network's) and reports every number in [0, 1].
Skipped without torch or scikit-learn."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest

import tripmine

torch = pytest.importorskip("torch")
pytest.importorskip("sklearn", reason="the example's data come from scikit-learn")

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "train_torch.py"


@pytest.fixture
def example():
    spec = importlib.util.spec_from_file_location("tripmine_example_train_torch", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    threads = torch.get_num_threads(), tripmine.get_num_threads()
    yield module
    torch.set_num_threads(threads[0])
    tripmine.set_num_threads(threads[1])


@pytest.mark.parametrize("argv", [["--steps", "60"], ["--steps", "60", "--memory", "512"]])
def test_training_raises_recall_of_the_seen_digits(example, capsys, argv):
    report = example.main(argv + ["--seed", "1"])
    scores = report["recall_at_1"]
    assert set(scores) == {"raw pixels", "untrained network", "trained network"}
    for values in scores.values():
        assert set(values) == {"held_out", "unseen"}
        assert all(0.0 <= v <= 1.0 for v in values.values())
    assert scores["trained network"]["held_out"] > scores["untrained network"]["held_out"]
    assert np.isfinite(report["final_loss"])
    text = capsys.readouterr().out
    assert "Recall@1" in text and "unseen digits" in text and "trained network" in text


def test_the_split_is_open_set_and_seeded(example):
    first, again = example.load_split(0), example.load_split(0)
    train_labels, held_out_labels = first["train"][1], first["held_out"][1]
    assert set(train_labels) == set(held_out_labels) == set(example.SEEN_DIGITS)
    assert set(first["unseen"][1]).isdisjoint(train_labels)
    assert len(train_labels) + len(held_out_labels) + len(first["unseen"][1]) == 1797
    for name in first:
        assert torch.equal(first[name][0], again[name][0])
