"""Cross-batch memory: a FIFO of past embeddings to mine against (XBM).

Wang, Zhang, Huang & Scott 2020, "Cross-Batch Memory for Embedding Learning":
after the first few thousand steps embeddings drift slowly, so those of past
batches are still good negatives (and positives).  Keeping the last ``size``
of them, detached, and mining each batch's anchors against the batch *and*
the memory gives every anchor thousands of candidates for the price of one
forward pass (pytorch-metric-learning's ``CrossBatchMemory``).  tripmine mines
against the memory in linear memory, so a bank of 100k rows costs no
N x M matrix.
"""

from __future__ import annotations

from typing import Any

import torch

from ._bridge import check_embeddings, label_tensor

__all__ = ["MemoryBank"]


class MemoryBank(torch.nn.Module):
    """A fixed-capacity FIFO of detached embeddings and their integer labels.

    ``size`` rows of ``dim`` features.  ``enqueue(embeddings, labels)``
    appends a batch, overwriting the oldest rows once full (a batch larger than
    ``size`` keeps its newest ``size`` rows); ``get()`` returns the filled part;
    ``reset()`` empties it.  The device and dtype are the constructor's, or,
    when not given, those of the first batch enqueued into an empty bank; later
    batches are converted to them.  The contents are buffers, so ``.to()``
    moves them and the ``state_dict`` saves them (with the write position).

    Use it with a loss: ``TripletLoss(memory=bank)`` or
    ``loss(x, labels, memory=bank)`` mines the batch against the batch followed
    by the bank, then enqueues the batch (after the loss, so a batch is never
    in its own memory twice).
    """

    def __init__(self, size: int, dim: int, *, device: Any = None,
                 dtype: torch.dtype | None = None):
        super().__init__()
        for name, value in (("size", size), ("dim", dim)):
            if isinstance(value, bool) or not isinstance(value, int):
                raise TypeError(f"{name} must be an integer, got {type(value).__name__}")
            if value < 1:
                raise ValueError(f"{name} must be >= 1, got {value}")
        if dtype is not None and not dtype.is_floating_point:
            raise TypeError(f"dtype must be a floating-point dtype, got {dtype}")
        self.size, self.dim = size, dim
        self._fixed_device, self._fixed_dtype = device is not None, dtype is not None
        self.register_buffer("embeddings", torch.zeros(size, dim, device=device,
                                                       dtype=dtype or torch.float32))
        self.register_buffer("labels", torch.zeros(size, device=device, dtype=torch.int64))
        self.position = 0  # the next row to write
        self.filled = 0  # rows holding data

    def __len__(self) -> int:
        return self.filled

    @property
    def is_full(self) -> bool:
        return self.filled == self.size

    def get(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(embeddings, labels) of the filled rows: views, in storage order (once
        the bank has wrapped around, not oldest-first; :meth:`ordered` sorts)."""
        return self.embeddings[:self.filled], self.labels[:self.filled]

    def ordered(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(embeddings, labels) of the filled rows, oldest first (a copy once wrapped)."""
        if self.filled < self.size or self.position == 0:
            return self.get()
        order = torch.cat([torch.arange(self.position, self.size),
                           torch.arange(0, self.position)]).to(self.embeddings.device)
        return self.embeddings[order], self.labels[order]

    def reset(self) -> None:
        """Forget everything (the storage is kept)."""
        self.position = self.filled = 0

    @torch.no_grad()
    def enqueue(self, embeddings: torch.Tensor, labels: Any) -> None:
        """Append a batch (detached); the oldest rows go once the bank is full."""
        check_embeddings(embeddings, "embeddings")
        if embeddings.dim() != 2 or embeddings.shape[1] != self.dim:
            raise ValueError(f"embeddings must have shape (batch, {self.dim}), got "
                             f"{tuple(embeddings.shape)}")
        if self.filled == 0:
            self._follow(embeddings)
        rows = embeddings.detach().to(device=self.embeddings.device,
                                      dtype=self.embeddings.dtype)
        codes = label_tensor(labels, self.embeddings.device)
        if codes.dim() != 1 or codes.shape[0] != rows.shape[0]:
            raise ValueError(f"labels must be 1-D with one label per row, got shape "
                             f"{tuple(codes.shape)} for {rows.shape[0]} rows")
        if rows.shape[0] >= self.size:  # only the newest rows fit
            self.embeddings.copy_(rows[-self.size:])
            self.labels.copy_(codes[-self.size:])
            self.position, self.filled = 0, self.size
            return
        start, count = self.position, rows.shape[0]
        first = min(count, self.size - start)
        self.embeddings[start:start + first] = rows[:first]
        self.labels[start:start + first] = codes[:first]
        if first < count:  # wrap around
            self.embeddings[:count - first] = rows[first:]
            self.labels[:count - first] = codes[first:]
        self.position = (start + count) % self.size
        self.filled = min(self.filled + count, self.size)

    def _follow(self, embeddings: torch.Tensor) -> None:
        """An empty bank takes the device and dtype of its first batch, unless fixed."""
        device = self.embeddings.device if self._fixed_device else embeddings.device
        dtype = self.embeddings.dtype if self._fixed_dtype else embeddings.dtype
        if (device, dtype) != (self.embeddings.device, self.embeddings.dtype):
            self.embeddings = torch.zeros(self.size, self.dim, device=device, dtype=dtype)
            self.labels = self.labels.to(device)

    def get_extra_state(self) -> dict:
        return {"position": self.position, "filled": self.filled}

    def set_extra_state(self, state: dict) -> None:
        self.position, self.filled = int(state["position"]), int(state["filled"])

    def extra_repr(self) -> str:
        return (f"size={self.size}, dim={self.dim}, filled={self.filled}, "
                f"dtype={self.embeddings.dtype}, device={self.embeddings.device}")
