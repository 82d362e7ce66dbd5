"""tripmine.torch.MemoryBank: FIFO semantics, and the cross-batch-memory (XBM) loss
against a pure-torch reference that mines the batch against concat(batch, bank)
with the batch's own pairs excluded."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
tt = pytest.importorskip("tripmine.torch")

from torch_reference import REFERENCES, contrastive_reference  # noqa: E402  (after the skip)


def rows(start, count, dim=3, dtype=torch.float32):
    """Rows whose first feature is their serial number: easy to follow through the FIFO."""
    serial = torch.arange(start, start + count, dtype=dtype)
    return torch.stack([serial] + [serial * 0.5] * (dim - 1), dim=1)


def serials(bank):
    embeddings, labels = bank.ordered()
    assert torch.equal(embeddings[:, 0].long(), labels)  # rows and labels stay paired
    return labels.tolist()


# --------------------------------------------------------------------------- FIFO


def test_fills_then_overwrites_the_oldest_rows():
    bank = tt.MemoryBank(8, 3)
    assert len(bank) == 0 and not bank.is_full
    assert bank.get()[0].shape == (0, 3) and bank.get()[1].shape == (0,)
    enqueued = 0
    for count in (3, 4, 5, 2, 7):
        bank.enqueue(rows(enqueued, count), torch.arange(enqueued, enqueued + count))
        enqueued += count
        expected = list(range(max(0, enqueued - 8), enqueued))
        assert serials(bank) == expected
        assert len(bank) == min(enqueued, 8)
    assert bank.is_full
    # get() is the storage order: the same rows as ordered(), as views of the buffers.
    embeddings, labels = bank.get()
    assert sorted(labels.tolist()) == serials(bank)
    assert embeddings.data_ptr() == bank.embeddings.data_ptr()


@pytest.mark.parametrize("count", [8, 9, 20])
def test_a_batch_at_least_as_large_as_the_bank_keeps_its_newest_rows(count):
    bank = tt.MemoryBank(8, 3)
    bank.enqueue(rows(100, 3), torch.arange(100, 103))
    bank.enqueue(rows(0, count), torch.arange(count))
    assert serials(bank) == list(range(count - 8, count))
    bank.enqueue(rows(50, 2), torch.arange(50, 52))
    assert serials(bank) == list(range(count - 6, count)) + [50, 51]


def test_reset_empties_the_bank():
    bank = tt.MemoryBank(4, 3)
    bank.enqueue(rows(0, 3), torch.arange(3))
    bank.reset()
    assert len(bank) == 0 and serials(bank) == []
    bank.enqueue(rows(7, 2), torch.arange(7, 9))
    assert serials(bank) == [7, 8]


def test_enqueued_rows_are_detached_copies():
    bank = tt.MemoryBank(4, 3)
    x = rows(0, 2).requires_grad_(True)
    y = x * 1.0
    bank.enqueue(y, np.arange(2))
    assert not bank.embeddings.requires_grad and bank.get()[0].grad_fn is None
    with torch.no_grad():
        y += 100.0  # the caller's tensor changes, the bank does not
    assert serials(bank) == [0, 1]


def test_device_and_dtype_follow_the_first_batch_unless_given():
    bank = tt.MemoryBank(4, 3)
    bank.enqueue(rows(0, 2, dtype=torch.float64), torch.arange(2))
    assert bank.embeddings.dtype == torch.float64
    bank.enqueue(rows(2, 1, dtype=torch.float16), torch.arange(2, 3))  # converted
    assert bank.embeddings.dtype == torch.float64 and serials(bank) == [0, 1, 2]
    fixed = tt.MemoryBank(4, 3, dtype=torch.float16, device="cpu")
    fixed.enqueue(rows(0, 2, dtype=torch.float64), torch.arange(2))
    assert fixed.embeddings.dtype == torch.float16 and serials(fixed) == [0, 1]


def test_state_dict_round_trip():
    bank = tt.MemoryBank(5, 3)
    for start in range(0, 12, 3):
        bank.enqueue(rows(start, 3), torch.arange(start, start + 3))
    copy = tt.MemoryBank(5, 3)
    copy.load_state_dict(bank.state_dict())
    assert serials(copy) == serials(bank) == list(range(7, 12))
    copy.enqueue(rows(12, 1), torch.arange(12, 13))
    assert serials(copy) == list(range(8, 13))


@pytest.mark.parametrize("call, error, match", [
    (lambda b: b.enqueue(rows(0, 2, dim=4), torch.arange(2)), ValueError, r"shape \(batch, 3\)"),
    (lambda b: b.enqueue(rows(0, 2), torch.arange(3)), ValueError, "one label per row"),
    (lambda b: b.enqueue(rows(0, 2), np.array(["a", "b"])), TypeError, "integers"),
    (lambda b: b.enqueue(rows(0, 2), torch.tensor([0.5, 1.5])), TypeError, "integers"),
    (lambda b: b.enqueue(np.ones((2, 3)), torch.arange(2)), TypeError, "torch.Tensor"),
])
def test_bad_batches_are_refused(call, error, match):
    bank = tt.MemoryBank(4, 3)
    with pytest.raises(error, match=match):
        call(bank)
    assert len(bank) == 0


@pytest.mark.parametrize("args, error", [((0, 3), ValueError), ((4, 0), ValueError),
                                         ((4.0, 3), TypeError), ((True, 3), TypeError)])
def test_bad_sizes_are_refused(args, error):
    with pytest.raises(error):
        tt.MemoryBank(*args)


# --------------------------------------------------------------------------- XBM loss


def labelled(seed, n, n_classes=5, dim=4):
    rng = np.random.default_rng(seed)
    x = torch.tensor(rng.standard_normal((n, dim)), requires_grad=True)
    return x, torch.from_numpy(rng.integers(0, n_classes, n))


def filled_bank(size=30, batches=3, seed=0):
    bank = tt.MemoryBank(size, 4)
    for step in range(batches):
        x, labels = labelled(seed + 100 + step, 12)
        bank.enqueue(x, labels)
    return bank


@pytest.mark.parametrize("mining", list(REFERENCES))
@pytest.mark.parametrize("metric", ["euclidean", "cosine"])
def test_xbm_triplet_loss_equals_the_torch_reference(mining, metric):
    bank = filled_bank()
    bank_x, bank_labels = (t.clone() for t in bank.ordered())
    x, labels = labelled(1, 12)
    options = dict(margin=0.4, soft=False, metric=metric, normalize=True, reduction="sum")
    criterion = tt.TripletLoss(mining=mining, memory=bank, **options)
    loss = criterion(x, labels)
    loss.backward()
    ours_grad = x.grad.clone()
    # The reference: ref = concat(batch, bank as it was), x[i] is ref[i].
    x.grad = None
    reference = REFERENCES[mining](x, labels, ref=torch.cat([x, bank_x.double()]),
                                   ref_labels=torch.cat([labels, bank_labels]), offset=0,
                                   **options)
    reference.backward()
    torch.testing.assert_close(loss, reference.detach(), rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(ours_grad, x.grad, rtol=1e-8, atol=1e-11)
    # Mined against the bank, not only the batch: some triplet reaches past row N.
    triplets = criterion.triplets
    if triplets is not None:
        assert max(triplets.positive.max(), triplets.negative.max()) >= 12
    # The batch was enqueued after the loss.
    assert torch.equal(bank.ordered()[0][-12:], x.detach())
    assert len(bank) == 30


@pytest.mark.parametrize("reduction", ["mean_nonzero", "mean"])
def test_xbm_contrastive_loss_equals_the_torch_reference(reduction):
    bank = filled_bank(size=20, seed=5)
    bank_x, bank_labels = (t.clone() for t in bank.ordered())
    x, labels = labelled(2, 12)
    options = dict(pos_margin=0.2, neg_margin=1.5, power=2, metric="euclidean",
                   normalize=False, reduction=reduction)
    loss = tt.contrastive_loss(x, labels, memory=bank, **options)
    loss.backward()
    ours_grad = x.grad.clone()
    x.grad = None
    reference = contrastive_reference(x, labels, ref=torch.cat([x, bank_x.double()]),
                                      ref_labels=torch.cat([labels, bank_labels]), offset=0,
                                      **options)
    reference.backward()
    torch.testing.assert_close(loss, reference.detach(), rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(ours_grad, x.grad, rtol=1e-8, atol=1e-11)


def test_empty_bank_is_self_mode_and_enqueue_can_be_skipped():
    x, labels = labelled(3, 16)
    bank = tt.MemoryBank(64, 4)
    with_bank = tt.triplet_loss(x, labels, memory=bank, mining="batch_all", enqueue=False)
    assert len(bank) == 0
    alone = tt.triplet_loss(x, labels, mining="batch_all")
    assert with_bank.item() == pytest.approx(alone.item(), rel=1e-12)
    tt.triplet_loss(x, labels, memory=bank)
    assert len(bank) == 16


def test_module_memory_trains_over_many_steps_and_is_saved():
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 3)
    bank = tt.MemoryBank(40, 3)
    criterion = tt.TripletLoss(mining="batch_hard", normalize=True, memory=bank)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    for step in range(7):  # wraps around the bank
        x, labels = labelled(step, 12)
        loss = criterion(model(x.detach().float()), labels)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        assert torch.isfinite(loss)
    assert len(bank) == 40 and bank.position == (7 * 12) % 40
    state = criterion.state_dict()
    assert {"memory.embeddings", "memory.labels", "memory._extra_state"} <= set(state)
    # A per-call bank overrides the module's (and the module's is left alone).
    other = tt.MemoryBank(10, 3)
    x, labels = labelled(9, 12)
    criterion(model(x.detach().float()), labels, memory=other)
    assert len(other) == 10 and bank.position == (7 * 12) % 40
