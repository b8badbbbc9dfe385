r"""Data-parallel SVI with ``torch.distributed``: each process fits a shard of the data.

A run launched by ``torchrun --nproc-per-node K`` starts K processes that each load the
whole data set. Process :math:`r` keeps the :math:`r`-th of K contiguous shards of the
*data plate* (the largest plate of the observed sites; every data argument whose first
axis has that plate's size is cut), and scales every site inside that plate, in the
story and in the guide, by K. Its ELBO estimate

.. math:: \widehat{\mathcal L}_r = \log p(\theta) - \log q(\theta)
          + K \sum_{i \in \text{shard } r} \ell_i(\theta)

averaged over the processes is the full-data ELBO,
:math:`\frac1K\sum_r \widehat{\mathcal L}_r = \log p(\theta) - \log q(\theta) + \sum_i
\ell_i(\theta)`, whatever the shards' sizes: so the gradients are all-reduced (summed,
divided by K) before every Adam step, as PyTorch's ``DistributedDataParallel`` does, and
every process makes the same update. Each process draws its own Monte Carlo sample of θ
(seed + rank), so the average also has K times fewer ELBO-noise than one process's.

Parameters start equal (broadcast from process 0 after they are created). A guide with
per-datum parameters (an AutoNormal over local latent sites) cannot be split this way
and is refused; amortised guides (an encoder network) and guides of global sites can.

Backend: ``gloo`` on CPU, ``nccl`` where CUDA is used.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch
from pyro.poutine.messenger import Messenger

from ppl_notes.errors import InferenceError, OptionError

__all__ = ["DataParallel", "launched_by_torchrun"]


def launched_by_torchrun() -> bool:
    """Whether this process has the environment ``torchrun`` gives its workers."""
    return all(key in os.environ for key in ("RANK", "WORLD_SIZE", "MASTER_ADDR"))


class _ScaleInPlate(Messenger):
    """Multiply the log density of every site inside plate ``name`` by ``factor``."""

    def __init__(self, name: str, factor: float) -> None:
        super().__init__()
        self.name, self.factor = name, factor

    def _process_message(self, msg) -> None:
        if any(frame.name == self.name for frame in msg.get("cond_indep_stack", ())):
            msg["scale"] = self.factor * msg["scale"]


class DataParallel:
    """A process's shard of the data, and the collective steps of a data-parallel run."""

    def __init__(self, facts, data: Mapping[str, Any]) -> None:
        import torch.distributed as dist

        if not dist.is_available():
            raise OptionError("method 'svi': distributed=True needs torch.distributed")
        if not dist.is_initialized():
            if not launched_by_torchrun():
                raise OptionError(
                    "method 'svi': distributed=True shards the data over the processes "
                    "that torchrun starts: launch with `torchrun --nproc-per-node K "
                    "script.py` (or `ppl-notes run STORY --method svi --distributed K`)")
            dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
        self.dist = dist
        self.rank, self.size = dist.get_rank(), dist.get_world_size()
        self.plate, total = _data_plate(facts)
        chunks = np.array_split(np.arange(total), self.size)
        self.indices = chunks[self.rank]
        cut = [k for k, v in data.items() if _leading(v) == total]
        if not cut:
            raise OptionError(f"method 'svi': distributed=True found no data argument whose "
                              f"first axis is the data plate {self.plate!r} ({total})")
        self.cut = cut
        self.shard = {k: (_take(v, self.indices) if k in cut else v) for k, v in data.items()}

    def scaled(self, fn):
        """``fn`` with its sites in the data plate weighted by the number of processes."""
        return _ScaleInPlate(self.plate, float(self.size))(fn)

    def share_parameters(self, params: dict[str, torch.Tensor]) -> None:
        """Check that every process has the same parameters, then copy process 0's."""
        shapes = {k: tuple(v.shape) for k, v in params.items()}
        gathered = [None] * self.size
        self.dist.all_gather_object(gathered, shapes)
        if any(g != shapes for g in gathered):
            differ = sorted(k for k in shapes if any(g.get(k) != shapes[k] for g in gathered))
            raise InferenceError(
                f"SVI distributed=True: the guide's parameters {differ} differ in shape "
                "between processes (one value per datum?); split the data only with guides "
                "whose parameters do not grow with the data (global sites, an encoder)")
        with torch.no_grad():
            for key in sorted(params):
                self.dist.broadcast(params[key].data, src=0)

    def mean_of(self, values: torch.Tensor) -> torch.Tensor:
        """``values`` averaged over the processes (every process gets the mean)."""
        values = values.detach().clone()
        self.dist.all_reduce(values)
        return values / self.size

    def average(self, loss: float, params) -> float:
        """All-reduce the gradients (and the loss) to their mean over the processes."""
        grads = [p.grad for p in params if p.grad is not None]
        flat = torch.cat([g.reshape(-1) for g in grads] + [torch.tensor([float(loss)],
                                                                        dtype=torch.float64)
                                                           .to(grads[0] if grads else "cpu")])
        self.dist.all_reduce(flat)
        flat /= self.size
        offset = 0
        for g in grads:
            g.copy_(flat[offset:offset + g.numel()].view_as(g))
            offset += g.numel()
        return float(flat[-1])


def _data_plate(facts) -> tuple[str, int]:
    """The largest plate around the observed sites: its name and size."""
    best = None
    for name in facts.likelihood:
        for frame in facts.trace.nodes[name]["cond_indep_stack"]:
            if frame.size is not None and (best is None or frame.size > best[1]):
                best = (frame.name, int(frame.size))
    if best is None:
        raise OptionError("method 'svi': distributed=True needs the observed sites inside a "
                          "plate (pyro.plate) to split the data along")
    return best


def _leading(value) -> int | None:
    shape = getattr(value, "shape", None)
    return int(shape[0]) if shape is not None and len(shape) > 0 else None


def _take(value, indices: np.ndarray):
    if isinstance(value, torch.Tensor):
        return value[torch.as_tensor(indices, device=value.device)]
    return np.asarray(value)[indices]
