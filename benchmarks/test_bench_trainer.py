"""tripmine inside a training step, with library-default threads (pytest-benchmark version
of ``benchmarks/trainer_step.py``, whose trainers it imports).

One benchmark group per N (``trainer step N=<N>``, N in 1024 and 4096).  The model is the
MLP 512 -> 1024 -> 1024 -> 128 (ReLU) of trainer_step.py, float32 on the CPU, over a fixed
standard-normal (N, 512) batch with shuffled P x K labels (K=4), SGD lr 1e-3.  Trainers:
``numpy`` (hand-written NumPy forward/backward, OpenBLAS sgemm; loss
``tripmine.triplet_loss(..., normalize=True)`` / ``tripmine.contrastive_loss(...,
normalize=True)``) and ``torch`` (``nn.Sequential`` + ``torch.optim.SGD``; loss
``tripmine.torch.TripletLoss(mining=rule, normalize=True)`` /
``tripmine.torch.ContrastiveLoss(normalize=True)``; skipped without torch).  Rules:
batch_hard, semi_hard, batch_all, distance_weighted (``seed=0``), contrastive.  Cases in
each group, per trainer T (case names carry the trainer so that they are unique within
the group, as report.py requires):

* ``T_step_<rule>`` -- one training step: forward + tripmine loss + backward + SGD update;
* ``T_model``       -- forward + backward + SGD update with a fixed dL/d(embeddings) (the
  batch-hard gradient at the initial embeddings), no tripmine call;
* ``T_loss_<rule>`` -- the tripmine call alone (loss + gradient) on fixed embeddings of
  the same shape (torch: the module's forward + ``backward()`` from a leaf tensor).

A report forms the overhead ``T_step_<rule> / (T_model + T_loss_<rule>) - 1``, as
trainer_step.py does (each quantity timed on its own, after conftest.py's settling pause);
the script, with its repeats and worst case, is the main tool.

Threads: LIBRARY DEFAULTS.  conftest.py's autouse ``threads`` fixture pins tripmine and
OpenBLAS to ``TRIPMINE_BENCH_THREADS``; this module overrides it with a ``threads``
fixture that pins nothing, and torch's thread count is not touched either (extra_info
records all three).  Run the module on its own for pristine defaults: after the other
modules of the suite, conftest.py restores the counts it found, which are the defaults'
values but set explicitly.  All numpy cases run before the first torch case (trainers
are a module-scoped parameter), so they time tripmine without torch loaded unless an
earlier module loaded it.
"""

from __future__ import annotations

import numpy as np
import pytest
import trainer_step as ts

from benchcommon import describe

NS = (1024, 4096)
MODEL_RULE = "batch_hard"  # whose gradient the model cases backpropagate

pytestmark = pytest.mark.benchmark(
    min_rounds=5, max_time=0.5, warmup=True, warmup_iterations=1, disable_gc=True
)


@pytest.fixture(scope="module", autouse=True)
def threads():
    """Overrides conftest.py's ``threads``: pins nothing (library-default threads)."""
    yield None


@pytest.fixture(scope="module", params=ts.TRAINERS)
def trainer_kind(request):
    """The trainer; "torch" skips when torch or tripmine.torch does not import."""
    if request.param == "torch":
        torch, reason = ts.import_torch()
        if torch is None:
            pytest.skip(f"torch trainer: {reason}")
    return request.param


@pytest.fixture(params=NS, ids=lambda n: f"N={n}")
def n(request):
    return request.param


def _describe(benchmark, trainer, case: str, op: str | None, quantity: str) -> None:
    extra = {}
    if trainer.kind == "torch":
        extra = dict(torch_threads=trainer.torch.get_num_threads(),
                     torch_version=trainer.torch.__version__)
    describe(benchmark, f"trainer step N={trainer.n}", f"{trainer.kind}_{case}", trainer.n,
             op=op, impl=f"{trainer.kind} trainer, {quantity}", k=ts.K, trainer=trainer.kind,
             quantity=quantity, d_in=ts.D_IN, hidden=ts.HIDDEN, lr=trainer.lr,
             threads_pinned=False, **extra)


def test_model(benchmark, trainer_kind, n):
    trainer = ts.make_trainer(trainer_kind, n, MODEL_RULE)
    _describe(benchmark, trainer, "model", None, "model only")
    benchmark.extra_info["fixed_grad_rule"] = MODEL_RULE
    benchmark(trainer.model)
    assert trainer.params_finite()


@pytest.mark.parametrize("rule", ts.RULES)
def test_loss(benchmark, trainer_kind, n, rule):
    trainer = ts.make_trainer(trainer_kind, n, rule)
    _describe(benchmark, trainer, f"loss_{rule}", rule, "loss only")
    loss = benchmark(trainer.loss)
    benchmark.extra_info["loss"] = loss
    assert np.isfinite(loss) and loss > 0


@pytest.mark.parametrize("rule", ts.RULES)
def test_step(benchmark, trainer_kind, n, rule):
    trainer = ts.make_trainer(trainer_kind, n, rule)
    _describe(benchmark, trainer, f"step_{rule}", rule, "step")
    loss = benchmark(trainer.step)
    benchmark.extra_info.update(loss=loss, initial_loss=trainer.initial_loss)
    assert np.isfinite(loss) and trainer.params_finite()
