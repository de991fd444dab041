"""Chunked losses equal the plain ones, values and gradients, and keep fewer logits alive at once."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from offsite.common.chunked_loss import chunked_mean, chunked_rows

VOCAB, HIDDEN = 1000, 16


def _head() -> torch.nn.Linear:
    torch.manual_seed(0)
    return torch.nn.Linear(HIDDEN, VOCAB, bias=False)


def _gradients(loss: torch.Tensor, *tensors: torch.Tensor) -> list[torch.Tensor]:
    return list(torch.autograd.grad(loss, tensors))


def test_chunked_rows_matches_the_plain_per_row_loss_and_its_gradients() -> None:
    head = _head()
    hidden = torch.randn(70, HIDDEN, requires_grad=True)
    targets = torch.randint(0, VOCAB, (70,))

    def nll(states: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(head(states), labels, reduction="none")

    plain = nll(hidden, targets)
    chunked = chunked_rows(nll, hidden, targets, chunk_rows=16)
    torch.testing.assert_close(chunked, plain)
    weights = torch.rand(70)  # a weighting, so each row's gradient is checked, not only their sum
    for got, want in zip(
        _gradients((chunked * weights).sum(), hidden, head.weight),
        _gradients((plain * weights).sum(), hidden, head.weight),
        strict=True,
    ):
        torch.testing.assert_close(got, want)


def test_chunked_mean_matches_a_mean_loss_with_dropout_inside() -> None:
    head = _head()
    hidden = torch.randn(50, HIDDEN, requires_grad=True)
    targets = torch.randint(0, VOCAB, (50,))
    dropout = torch.nn.Dropout(0.3)

    def loss(states: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return 0.5 * F.mse_loss(dropout(states), states.detach()) + F.cross_entropy(head(states), labels)

    torch.manual_seed(1)
    chunked = chunked_mean(loss, hidden, targets, chunk_rows=8)
    chunked_gradient = _gradients(chunked, hidden, head.weight)  # the recomputation must redraw the same masks
    with torch.no_grad():
        torch.manual_seed(1)
        per_chunk = [loss(hidden[s : s + 8], targets[s : s + 8]) * len(targets[s : s + 8]) for s in range(0, 50, 8)]
    torch.testing.assert_close(chunked.detach(), torch.stack(per_chunk).sum() / 50)
    dropout.eval()  # without dropout the plain full-batch loss is the reference
    plain = loss(hidden, targets)
    chunked = chunked_mean(loss, hidden, targets, chunk_rows=8)
    torch.testing.assert_close(chunked, plain)
    for got, want in zip(_gradients(chunked, hidden, head.weight), _gradients(plain, hidden, head.weight), strict=True):
        torch.testing.assert_close(got, want)
    assert all(g.abs().sum() > 0 for g in chunked_gradient)


def test_the_backward_never_holds_every_chunks_logits() -> None:
    """Under checkpointing only the chunk inputs are saved for the backward, not [rows, vocab] logits."""
    head = _head()
    hidden = torch.randn(256, HIDDEN, requires_grad=True)
    targets = torch.randint(0, VOCAB, (256,))
    saved: list[torch.Size] = []

    def nll(states: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(head(states), labels, reduction="none")

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        saved.append(tensor.shape)
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        chunked_rows(nll, hidden, targets, chunk_rows=32).sum()
    assert saved and all(shape.numel() < 32 * VOCAB for shape in saved), saved
    saved.clear()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        nll(hidden, targets).sum()
    assert any(shape.numel() >= 256 * VOCAB for shape in saved)  # the plain path keeps the whole batch's logits
