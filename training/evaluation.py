"""Validation loss, perplexity and token accuracy over a stream of batches (model.batch.Batch)."""

import math
from collections.abc import Callable, Iterable

import torch
from tqdm import tqdm
from torch import nn

from model.batch import Batch


@torch.no_grad()
def evaluate(model: nn.Module, batches: Iterable | object, max_batches: int, device: torch.device,
             progress: bool = False, reduce: Callable[[torch.Tensor], torch.Tensor] | None = None) -> dict:
    """Mean loss over every learnable token of up to `max_batches` batches (0 = all of them).

    `batches` is a loader with reset(), n_batches and next_batch() (data.loader.TokenLoader's windows,
    data.packing.PackedLoader's packed samples), read from the top for one pass at most, or any iterable of Batch
    or (input_ids, labels) pairs. Positions labelled -100 count nowhere, so an SFT split is scored on the assistant's
    tokens only. Returns val_loss, val_ppl = exp(val_loss), val_token_acc, val_tokens. progress=True shows a
    progress bar (eval.py; train.py's periodic evaluations stay quiet). Under torchrun, each rank reads its share
    of every batch and reduce sums the totals over ranks.
    """
    total = max_batches or None
    if hasattr(batches, "reset"):
        loader = batches
        loader.reset()
        total = loader.n_batches if max_batches <= 0 else min(max_batches, loader.n_batches)
        batches = (loader.next_batch() for _ in range(total))
    batches = tqdm(batches, desc="evaluating", unit="batch", total=total, disable=not progress)
    was_training = model.training
    model.eval()
    totals = torch.zeros(3, dtype=torch.float64, device=device)  # loss sum, tokens, correct
    for i, batch in enumerate(batches):
        if max_batches > 0 and i >= max_batches:
            break
        if not isinstance(batch, Batch):
            batch = Batch.from_windows(*batch)
        out = model(batch.to(device))
        totals += torch.stack([out.loss_sum.double(), out.n_tokens.double(), out.n_correct.double()])
    model.train(was_training)
    if reduce is not None:
        totals = reduce(totals)
    loss_sum, n_tokens, n_correct = totals[0], int(totals[1]), int(totals[2])
    loss = (loss_sum / max(n_tokens, 1)).item()
    return {"val_loss": loss, "val_ppl": perplexity(loss), "val_token_acc": n_correct / max(n_tokens, 1),
            "val_tokens": n_tokens}


def perplexity(loss: float) -> float:
    """exp(loss): inf beyond what a float holds (loss > ~709.8), NaN for a NaN loss."""
    try:
        return math.exp(loss)
    except OverflowError:
        return math.inf
