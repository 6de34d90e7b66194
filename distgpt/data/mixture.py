"""A mixture of prepared datasets at fixed shares of every global batch — e.g. 80% a new language, 20% replay of the
original one while continuing pre-training (less forgetting).

Pure function of the global sample position, like the loader: of each global batch of B positions, the first
round(B·f_k) go to mixed-in dataset k (in the order given), the rest to the job's own dataset. Position j of step s
in part k is that part's sample number s·n_k + (j − offset_k), drawn through the part's own shuffle (its own seed).
So the state is still the loader's two integers, every rank computes its rows alone, and no sample of any part is
repeated or skipped within an epoch of that part.
"""

from __future__ import annotations

import numpy as np
import torch

from distgpt import storage
from distgpt.data.loader import DatasetError, TokenDataset, sample_ids


class Mixture:
    """``main`` plus ``(dataset, share)`` parts, laid out in every global batch of ``global_batch`` positions."""

    def __init__(self, main: TokenDataset, parts: list[tuple[TokenDataset, float]], global_batch: int):
        counts = [round(global_batch * share) for _, share in parts]
        if sum(counts) >= global_batch or min(counts, default=1) < 1:
            raise DatasetError(f"data.mix: shares {[s for _, s in parts]} of a global batch of {global_batch} must "
                               "give each mixed-in dataset ≥ 1 sample and leave ≥ 1 for the job's own — change the "
                               "shares or train.global_batch_size")
        for ds, _ in parts:
            if ds.seq_len != main.seq_len or set(ds.columns) != set(main.columns):
                raise DatasetError(f"data.mix: every dataset needs seq_len {main.seq_len} and columns "
                                   f"{sorted(main.columns)}, got {ds.seq_len} and {sorted(ds.columns)}")
        self.global_batch = global_batch
        self.parts = [(ds, n) for (ds, _), n in zip(parts, counts, strict=True)]
        self.parts.append((main, global_batch - sum(counts)))
        self.offsets = np.cumsum([0] + [n for _, n in self.parts])
        self.seq_len = main.seq_len
        self.columns = main.columns
        self.manifest = main.manifest

    def __len__(self) -> int:
        return len(self.parts[-1][0])

    def counts(self) -> list[int]:
        """Samples per global batch of each part (mixed-in datasets first, the job's own last)."""
        return [n for _, n in self.parts]

    def rows(self, seed: int, start: int, count: int, shuffle: bool = True) -> dict[str, torch.Tensor]:
        """Columns of global positions start .. start+count-1 (within one global batch, as a rank's share is)."""
        step, j0 = divmod(start, self.global_batch)
        if j0 + count > self.global_batch:
            raise ValueError("a mixture serves a rank's share of one global batch at a time")
        out: list[dict[str, torch.Tensor]] = []
        for k, (ds, n) in enumerate(self.parts):
            lo, hi = max(j0, self.offsets[k]), min(j0 + count, self.offsets[k + 1])
            if lo < hi:
                first = step * n + int(lo - self.offsets[k])
                out.append(ds.take_columns(sample_ids(len(ds), seed + k + 1, first, int(hi - lo), shuffle)))
        return {name: torch.cat([o[name] for o in out]) for name in out[0]}


def open_mixture(main: TokenDataset, mix: dict[str, float], split: str, global_batch: int) -> Mixture:
    """The job's dataset mixed with ``data.mix`` (prepared-dataset URI → share of every global batch)."""
    parts = []
    for uri, share in mix.items():
        try:
            parts.append((TokenDataset(uri, split), share))
        except DatasetError as e:
            raise DatasetError(f"data.mix: {storage.redact(uri)}: {e}") from None
    return Mixture(main, parts, global_batch)
