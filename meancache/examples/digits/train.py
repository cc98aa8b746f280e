"""Train the embedded digits model: ``python -m meancache.examples.digits.train [--steps N] [--out FILE]``.

Rectified-flow matching on scikit-learn's 8x8 digits (1,797 images, shipped with scikit-learn, no download):
``x_t = (1 - t) x_0 + t e`` with ``t ~ U(0, 1)``, and the transformer regresses the velocity ``e - x_0``, the
convention of diffusers' ``FlowMatchEulerDiscreteScheduler``. One label in ten is replaced by the null class so the
same network also gives the unconditional velocity of classifier-free guidance. AdamW with a linear warm-up and a
cosine decay; the saved weights are an exponential moving average of the trained ones.

The defaults are the settings that produced the packaged ``weights/digits.safetensors``: 5,000 steps, 585 s on
the 2-core development machine (bench/RESULTS.md has the run).
"""

from __future__ import annotations

import argparse
import math
import time

import torch

from .model import NULL_CLASS
from .model import build_pipeline
from .model import pack
from .model import save_weights
from .model import velocity

__all__ = ["load_data", "train", "main"]


def load_data() -> tuple[torch.Tensor, torch.Tensor]:
    """scikit-learn's digits: images ``(1797, 8, 8)`` float32 in [-1, 1] and labels ``(1797,)`` int64.

    >>> x, y = load_data()
    >>> tuple(x.shape), float(x.min()), float(x.max()), sorted(set(y.tolist())) == list(range(10))
    ((1797, 8, 8), -1.0, 1.0, True)
    """
    from sklearn.datasets import load_digits

    data = load_digits()
    images = torch.tensor(data.images, dtype=torch.float32) / 16 * 2 - 1
    return images, torch.tensor(data.target, dtype=torch.long)


def train(
    steps: int = 5000,
    *,
    batch_size: int = 128,
    lr: float = 1e-3,
    warmup: int = 200,
    label_drop: float = 0.1,
    ema_decay: float = 0.999,
    seed: int = 0,
    log_every: int = 250,
):
    """Train a fresh :class:`~meancache.examples.digits.DigitsPipeline` and return it with the EMA weights loaded.

    Args:
        steps: optimizer steps (>= 1).
        batch_size: images per step, drawn with replacement.
        lr: peak AdamW learning rate, reached after ``warmup`` steps, then cosine-decayed to 0.
        label_drop: fraction of labels replaced by the null class (unconditional training).
        ema_decay: decay of the weight average that is returned (capped early on by ``(1 + n) / (10 + n)``).
        seed: seeds the initialisation and the batches.
        log_every: print the mean loss every this many steps (0: silent).

    Returns:
        ``(pipe, losses)``: the pipeline (float32, CPU) and the loss of every step.

    Example::

        >>> pipe, losses = train(steps=2, batch_size=8, log_every=0)
        >>> len(losses), all(l > 0 for l in losses)
        (2, True)
    """
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps={steps!r}: must be an int >= 1")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size={batch_size!r}: must be an int >= 1")
    if not 0 <= label_drop < 1:
        raise ValueError(f"label_drop={label_drop!r}: must be in [0, 1)")
    images, targets = load_data()
    pipe = build_pipeline(seed)
    modules = [pipe.transformer, pipe.class_embedding]
    params = [p for m in modules for p in m.parameters()]
    ema = [p.detach().clone() for p in params]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)

    def lr_at(i: int) -> float:
        if i < warmup:
            return lr * (i + 1) / warmup
        return lr * 0.5 * (1 + math.cos(math.pi * (i - warmup) / max(1, steps - warmup)))

    gen = torch.Generator().manual_seed(seed)
    for m in modules:
        m.train()
    losses, t0 = [], time.perf_counter()
    # enable_grad: a caller that switched autograd off globally still gets a trained model
    with torch.enable_grad():
        for i in range(steps):
            idx = torch.randint(0, images.shape[0], (batch_size,), generator=gen)
            x0 = pack(images[idx])
            labels = targets[idx].clone()
            labels[torch.rand(batch_size, generator=gen) < label_drop] = NULL_CLASS
            noise = torch.randn(x0.shape, generator=gen)
            t = torch.rand(batch_size, generator=gen)
            xt = (1 - t[:, None, None]) * x0 + t[:, None, None] * noise
            pred = velocity(pipe.transformer, pipe.class_embedding, xt, t, labels)
            loss = torch.nn.functional.mse_loss(pred, noise - x0)
            for group in opt.param_groups:
                group["lr"] = lr_at(i)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            with torch.no_grad():
                torch._foreach_lerp_(ema, [p.detach() for p in params], 1 - min(ema_decay, (1 + i) / (10 + i)))
            losses.append(float(loss.detach()))
            if log_every and (i + 1) % log_every == 0:
                recent = sum(losses[-log_every:]) / log_every
                print(f"step {i + 1}/{steps}  loss {recent:.4f}  lr {lr_at(i):.2e}  {time.perf_counter() - t0:.0f} s")
    with torch.no_grad():
        for p, e in zip(params, ema):
            p.copy_(e)
    for m in modules:
        m.eval()
    return pipe, losses


def main(argv=None) -> None:
    """Command line: train and write the weights (the defaults are the packaged file's settings)."""
    from .model import WEIGHTS_PATH

    parser = argparse.ArgumentParser(prog="python -m meancache.examples.digits.train", description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=5000)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads (default 2)")
    parser.add_argument("--out", default=str(WEIGHTS_PATH), help=f"weight file to write (default {WEIGHTS_PATH})")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    pipe, losses = train(args.steps, batch_size=args.batch_size, lr=args.lr, seed=args.seed)
    save_weights(pipe, args.out)
    print(f"trained {args.steps} steps in {time.perf_counter() - t0:.0f} s, final loss {losses[-1]:.4f}: {args.out}")


if __name__ == "__main__":
    main()
