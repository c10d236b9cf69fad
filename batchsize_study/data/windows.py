"""Windows over a token file, the seeded training order, and the Lightning data module.

Training reads only train.bin, validation only val.bin; test.bin is for the evaluation of saved
models and is opened by nothing here.
"""

from __future__ import annotations

import os
from collections.abc import Iterator

import lightning.pytorch as pl
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from batchsize_study.config import DataConfig
from batchsize_study.data.prepare import PreparedCorpus
from batchsize_study.errors import DataError


class TokenWindows(Dataset):
    """Non-overlapping windows of ``seq_len + 1`` tokens over a flat token file (a memmap)."""

    def __init__(self, path: str, dtype: str, seq_len: int, max_windows: int | None = None) -> None:
        self.path, self.dtype, self.seq_len = path, np.dtype(dtype), seq_len
        n_tokens = os.path.getsize(path) // self.dtype.itemsize
        self.n = max(0, (n_tokens - 1) // seq_len)
        if max_windows is not None:
            self.n = min(self.n, max_windows)
        self._mm: np.memmap | None = None

    def __len__(self) -> int:
        return self.n

    def _data(self) -> np.memmap:
        # Opened lazily so each DataLoader worker maps the file itself (no pickled memmaps).
        if self._mm is None:
            self._mm = np.memmap(self.path, dtype=self.dtype, mode="r")
        return self._mm

    def __getitem__(self, i: int) -> torch.Tensor:
        start = i * self.seq_len
        return torch.from_numpy(self._data()[start : start + self.seq_len + 1].astype(np.int64))

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        state["_mm"] = None
        return state


class SeededWindowSampler(Sampler[int]):
    """The training order: epoch e is ``randperm(n, seed=(seed, e))``; rank r takes every
    world-th index of that global stream, for exactly ``num_samples`` samples.

    The order is a pure function of (seed, sample index), so a resumed run can start at
    ``start`` without replaying anything, and the effective batch sees the same sequences
    whatever the device count.
    """

    def __init__(
        self, n: int, seed: int, num_samples: int, rank: int = 0, world: int = 1, start: int = 0
    ) -> None:
        if n <= 0:
            raise DataError(
                "the training split gives no windows; use a larger corpus or a smaller model.seq_len"
            )
        self.n, self.seed, self.num_samples = n, seed, num_samples
        self.rank, self.world, self.start = rank, world, start
        self._epoch, self._perm = -1, torch.empty(0, dtype=torch.long)

    def __len__(self) -> int:
        return max(0, self.num_samples - self.start)

    def index(self, k: int) -> int:
        """The window for this rank's k-th sample."""
        j = k * self.world + self.rank
        epoch, pos = divmod(j, self.n)
        if epoch != self._epoch:
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            self._perm, self._epoch = torch.randperm(self.n, generator=g), epoch
        return int(self._perm[pos])

    def __iter__(self) -> Iterator[int]:
        for k in range(self.start, self.num_samples):
            yield self.index(k)


class _ResumedSampler(SeededWindowSampler):
    """len() counts the whole run, skipped samples included: Lightning restores its batch counter
    from the checkpoint and neither skips nor replays batches itself, so its counter then lines up
    with the batches still to come (validation and the end fall at the same batches)."""

    def __len__(self) -> int:
        return self.num_samples


class TokenDataModule(pl.LightningDataModule):
    """Windows of the prepared corpus: seeded training order, a fixed validation set."""

    def __init__(
        self,
        cfg: DataConfig,
        corpus: PreparedCorpus,
        seq_len: int,
        micro_batch_size: int,
        seed: int,
        samples_per_rank: int,
    ) -> None:
        super().__init__()
        self.cfg, self.corpus, self.seq_len = cfg, corpus, seq_len
        self.micro_batch_size, self.seed, self.samples_per_rank = (
            micro_batch_size,
            seed,
            samples_per_rank,
        )
        self.start_sample = 0  # set by resume: samples this rank already consumed

    def prepare_data(self) -> None:
        # Prepared by the caller, which needs the vocabulary to build the model (and may have
        # given prepare_corpus a token budget that the settings alone do not show): only check
        # that the cache is still there.
        if not os.path.exists(os.path.join(self.corpus.dir, "meta.json")):
            raise DataError(
                f"the token cache {self.corpus.dir} is gone; run again to rebuild it "
                "(data.cache_dir or $BATCHSIZE_STUDY_CACHE)"
            )

    def _rank_world(self) -> tuple[int, int]:
        trainer = self.trainer
        return (trainer.global_rank, trainer.world_size) if trainer is not None else (0, 1)

    def train_dataloader(self) -> DataLoader:
        ds = TokenWindows(self.corpus.train_path, self.corpus.dtype, self.seq_len)
        rank, world = self._rank_world()
        start = self.start_sample
        if not start and self.trainer is not None and self.trainer.global_step:
            # Resumed (Lightning restores the loops before it asks for the loader): skip what the
            # optimizer steps so far consumed on this rank.
            start = self.trainer.global_step * self.trainer.accumulate_grad_batches
            start *= self.micro_batch_size
        sampler = (_ResumedSampler if start else SeededWindowSampler)(
            len(ds), self.seed, self.samples_per_rank, rank, world, start
        )
        return DataLoader(
            ds,
            batch_size=self.micro_batch_size,
            sampler=sampler,
            num_workers=self.cfg.num_workers,
            pin_memory=torch.cuda.is_available(),
            persistent_workers=self.cfg.num_workers > 0,
            drop_last=True,
        )

    def val_dataloader(self) -> DataLoader:
        ds = TokenWindows(
            self.corpus.val_path, self.corpus.dtype, self.seq_len, self.cfg.val_max_windows
        )
        rank, world = self._rank_world()
        indices = list(range(rank, len(ds), world))
        return DataLoader(
            torch.utils.data.Subset(ds, indices),
            batch_size=self.micro_batch_size,
            shuffle=False,
            num_workers=0,
        )
