"""Spawning gloo process groups for the torch.distributed tests: a free port on localhost,
one spawn of ``nprocs`` workers, and each rank's results read back from its ``.npz``."""

from __future__ import annotations

import socket
from pathlib import Path
from typing import Callable

import numpy as np


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def spawn_ranks(worker: Callable, nprocs: int, out_dir: Path, *leading) -> list[dict]:
    """Runs ``worker(rank, *leading, port, str(out_dir))`` in ``nprocs`` processes; each
    rank saves ``rank<r>.npz`` in ``out_dir``, returned here in rank order."""
    import torch.multiprocessing

    torch.multiprocessing.spawn(worker, args=(*leading, free_port(), str(out_dir)),
                                nprocs=nprocs, join=True)
    return [dict(np.load(Path(out_dir) / f"rank{r}.npz")) for r in range(nprocs)]


def assert_ddp_step(results: list[dict], loss: float, weight_grad: np.ndarray,
                    bias_grad: np.ndarray, rtol: float) -> None:
    """Every rank's DDP step ("ddp/loss", "ddp/weight", "ddp/bias" in its results) equals the
    single-process one: the loss to 1e-12, the backbone's gradients to ``rtol``."""
    import pytest

    for result in results:
        assert float(result["ddp/loss"]) == pytest.approx(loss, rel=1e-12)
        np.testing.assert_allclose(result["ddp/weight"], weight_grad, rtol=rtol, atol=1e-13)
        np.testing.assert_allclose(result["ddp/bias"], bias_grad, rtol=rtol, atol=1e-13)


def record_outcomes(found: dict, calls) -> dict:
    """Runs each (case, call) of ``calls`` on this rank and records in ``found`` under
    "fail/<case>" either "none" or the refusal ("ValueError: ..." / "RuntimeError: ...")."""
    for case, call in calls:
        try:
            call()
            found[f"fail/{case}"] = np.array("none")
        except (ValueError, RuntimeError) as exc:
            found[f"fail/{case}"] = np.array(f"{type(exc).__name__}: {exc}")
    return found
