"""AdamW, gradient clipping, learning-rate warmup and an EMA of the weights, by hand.

Parameters are the model's own arrays ({name: array}); updates are in place, so the model sees
them without any copying.
"""
import math

from .backend import xp_of


class AdamW:
    """Adam with decoupled weight decay (Loshchilov & Hutter 2019), as torch.optim.AdamW:
        p <- p - lr * wd * p
        m <- b1 m + (1 - b1) g,   v <- b2 v + (1 - b2) g^2
        p <- p - lr * (m / (1 - b1^k)) / (sqrt(v / (1 - b2^k)) + eps)
    """

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0, decay=None):
        """`decay(name, array) -> bool` picks the parameters that get weight decay (default: all,
        as U-ViT; the ViT classifier decays only its weight matrices)."""
        self.params = params
        self.lr, self.betas, self.eps, self.weight_decay = lr, betas, eps, weight_decay
        self.decayed = {k for k, p in params.items() if decay is None or decay(k, p)}
        self.m = {k: xp_of(p).zeros_like(p) for k, p in params.items()}
        self.v = {k: xp_of(p).zeros_like(p) for k, p in params.items()}
        self.k = 0  # steps taken

    def step(self, grads, lr=None):
        lr = self.lr if lr is None else lr
        b1, b2 = self.betas
        self.k += 1
        c1, c2 = 1.0 - b1 ** self.k, 1.0 - b2 ** self.k
        for name, p in self.params.items():
            g, m, v = grads[name], self.m[name], self.v[name]
            xp = xp_of(p)
            if self.weight_decay and name in self.decayed:
                p *= 1.0 - lr * self.weight_decay
            m *= b1
            m += (1.0 - b1) * g
            v *= b2
            v += (1.0 - b2) * (g * g)
            denom = xp.sqrt(v * (1.0 / c2))
            denom += self.eps
            p -= (lr / c1) * m / denom

    def state(self):
        """Moments as {"m.name": array, "v.name": array} and the step count, for checkpoints."""
        out = {f"m.{k}": a for k, a in self.m.items()}
        out.update({f"v.{k}": a for k, a in self.v.items()})
        return out

    def load_state(self, arrays, k):
        for name in self.params:
            self.m[name][...] = arrays[f"m.{name}"]
            self.v[name][...] = arrays[f"v.{name}"]
        self.k = int(k)


def clip_grad_norm(grads, max_norm):
    """Scale all gradients together so their global L2 norm is at most max_norm; returns the norm."""
    total = float(sum((g * g).sum() for g in grads.values())) ** 0.5  # one device->host sync
    if max_norm and total > max_norm:
        scale = max_norm / (total + 1e-6)
        for g in grads.values():
            g *= scale
    return total


def lr_at(step, base_lr, warmup, total_steps=None, schedule="constant"):
    """Linear warmup over `warmup` steps, then constant (U-ViT) or cosine decay to 0."""
    if warmup and step < warmup:
        return base_lr * (step + 1) / warmup
    if schedule == "cosine" and total_steps:
        frac = min((step - warmup) / max(total_steps - warmup, 1), 1.0)
        return base_lr * 0.5 * (1.0 + math.cos(math.pi * frac))
    return base_lr


class EMA:
    """An exponential moving average of the weights: e <- d e + (1 - d) p after every step.

    With warmup, step k uses d_k = min(d, (1 + k) / (10 + k)), so that the average forgets the
    random initial weights quickly: with d = 0.999 alone, 37% of the average after 1,000 steps
    would still be the initialisation, which ruins the samples of a short run.
    """

    def __init__(self, params, decay=0.999, warmup=True):
        self.decay, self.warmup = decay, warmup
        self.shadow = {k: p.copy() for k, p in params.items()}

    def decay_at(self, step):
        return min(self.decay, (1.0 + step) / (10.0 + step)) if self.warmup else self.decay

    def update(self, params, step):
        d = self.decay_at(step)
        for k, p in params.items():
            e = self.shadow[k]
            e *= d
            e += (1.0 - d) * p
