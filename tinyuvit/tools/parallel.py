"""Data parallelism over CPU cores: every core runs the whole model on its share of the batch.

NumPy runs a matmul on several cores (BLAS threads) but everything else (LayerNorm, softmax,
GELU, reshapes) on one. A transformer this small spends most of its time in that "everything
else", so instead of splitting each matmul we split the batch, as multi-GPU training does:

    batch [B, ...] -> shards [B/n, ...], one per thread
    each thread: forward (and backward) of its own replica of the model (the same parameter
                 arrays, its own activations), with single-threaded BLAS
    outputs: concatenated;  parameter gradients: summed over the replicas

NumPy releases the GIL inside its loops, so the threads really run at once. The results equal
the one-thread results up to float rounding (sums are taken in another order).
"""
import copy
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from ..backend import cpu_threads
from ..optim import flatten

_BLAS = None


def _one_blas_thread():
    """A context in which BLAS uses one thread (each shard's thread is already one core)."""
    global _BLAS
    if _BLAS is None:
        from threadpoolctl import ThreadpoolController
        _BLAS = ThreadpoolController()
    return _BLAS.limit(limits=1, user_api="blas")


class DataParallel:
    """Wraps a UViT so that forward, backward and grad_dict run on `threads` CPU threads at
    once; every other attribute (cfg, dtype, state_dict, ...) is the wrapped model's."""

    def __init__(self, model, threads):
        if threads < 1:
            raise ValueError(f"threads must be >= 1, got {threads}")
        self.model = model
        # Replicas hold their own activations but the model's parameter arrays, so in-place
        # updates of the parameters (AdamW, EMA, loading a checkpoint) reach every replica.
        self.replicas = [model]
        for _ in range(threads - 1):
            replica = copy.deepcopy(model)
            replica.load_state_dict(model.state_dict())
            self.replicas.append(replica)
        self.pool = ThreadPoolExecutor(threads - 1, thread_name_prefix="tinyuvit") if threads > 1 else None
        self.shards = None
        self._gathered = None   # [P], one replica's gradients in flat_grad (kept: fresh memory is slow)

    def __getattr__(self, name):
        if name == "model":  # not set yet (copying): no recursion
            raise AttributeError(name)
        return getattr(self.model, name)

    def _run(self, fn):
        """[fn(replica_i, shard_i)]: shard 0 on this thread, the others on the pool."""
        with _one_blas_thread():
            jobs = [self.pool.submit(fn, r, s) for r, s in zip(self.replicas[1:], self.shards[1:])]
            first = fn(self.model, self.shards[0])
            return [first] + [j.result() for j in jobs]

    def forward(self, x, t, y, *, train=True):
        """The model's forward on shards of the batch: [B, ...] -> outputs concatenated.
        `train=False`: the inference forward, keeping nothing for backward (UViT.forward)."""
        B = x.shape[0]
        bounds = np.linspace(0, B, min(len(self.replicas), B) + 1).round().astype(int).tolist()
        self.shards = [slice(a, b) for a, b in zip(bounds[:-1], bounds[1:])]
        outs = self._run(lambda m, s: m.forward(x[s], t[s], y[s], train=train))
        return outs[0] if len(outs) == 1 else np.concatenate(outs)

    __call__ = forward

    def backward(self, dout):
        """The model's backward, shard by shard as the last forward split the batch."""
        dxs = self._run(lambda m, s: m.backward(dout[s]))
        return dxs[0] if len(dxs) == 1 else np.concatenate(dxs)

    def flat_grad(self, out=None):
        """The whole batch's gradients as one flat array [P] (`out` if given), in named_parameters
        order as optim.FlatParams: each replica's gathered with one concatenate, then added."""
        first, *rest = self.replicas[:len(self.shards)]         # those that had a shard
        total = flatten(first.grad_dict().values(), out=out)
        for r in rest:
            self._gathered = flatten(r.grad_dict().values(), out=self._gathered)
            total += self._gathered
        return total

    def grad_dict(self):
        """The whole batch's gradients {name: array}: views into `flat_grad()`."""
        grads, flat, offset = {}, self.flat_grad(), 0
        for name, g in self.model.grad_dict().items():          # for the names and shapes
            grads[name] = flat[offset:offset + g.size].reshape(g.shape)
            offset += g.size
        return grads


def on_cpu_threads(model, threads=None):
    """A NumPy model split over `threads` CPU threads (default: `backend.cpu_threads()`, every
    core unless --threads says otherwise); a CuPy model (or one already split) as it is."""
    if isinstance(model, DataParallel) or model.xp is not np:
        return model
    return DataParallel(model, threads or cpu_threads())
