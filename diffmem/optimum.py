"""The theoretical optimum (paper §2): the denoiser of the empirical training distribution.

D*(x; sigma) = sum_n w_n y_n,  w = softmax_n(-||x - y_n||^2 / (2 sigma^2))
It minimises the denoising loss on the training set exactly, and sampling it with the EDM sampler can
only reproduce training images. Computed in chunks over the training set with a streaming softmax
(running max and sum), so memory is bounded by batch x chunk, not batch x |D|.

    python -m diffmem.optimum --config experiments/digits.yaml --set data.size=64
"""
from __future__ import annotations

import math

import torch

from diffmem.memorization import _smallest, _BLOCK


def optimal_denoiser(x: torch.Tensor, sigma, train_images: torch.Tensor, train_labels: torch.Tensor | None = None,
                     class_labels: torch.Tensor | None = None, chunk_size: int = 8192) -> torch.Tensor:
    """D*(x; sigma) = sum_n w_n y_n, w = softmax_n(-||x - y_n||^2 / (2 sigma^2)), every term as written (module
    docstring), in the training images' dtype; with labels, the softmax of each row runs over its class. The
    plain computation: EmpiricalOptimalDenoiser is checked against it (tests/test_optimum_fast.py) and
    measured against it (bench/optimum.py)."""
    train = train_images.reshape(len(train_images), -1)
    flat = x.reshape(len(x), -1).to(device=train.device, dtype=train.dtype)
    sigma = torch.as_tensor(sigma, dtype=train.dtype, device=train.device).reshape(-1, 1)
    inv_two_var = 1 / (2 * sigma ** 2)
    x_sq = (flat ** 2).sum(1, keepdim=True)
    run_max = torch.full((len(flat), 1), -torch.inf, dtype=train.dtype, device=train.device)
    run_sum = torch.zeros_like(run_max)
    acc = torch.zeros_like(flat)
    for start in range(0, len(train), chunk_size):   # a streaming softmax: memory batch x chunk, not x |D|
        y = train[start:start + chunk_size]
        logits = -(x_sq - 2 * flat @ y.T + (y ** 2).sum(1)).clamp_min(0) * inv_two_var
        if train_labels is not None and class_labels is not None:
            other = class_labels.reshape(-1, 1).to(train.device) != train_labels[start:start + chunk_size]
            logits = logits.masked_fill(other, -torch.inf)
        new_max = torch.maximum(run_max, logits.amax(1, keepdim=True))
        rescale = torch.exp(run_max - new_max).nan_to_num(0.0)    # exp(-inf - -inf) on an empty start
        w = torch.exp(logits - new_max).nan_to_num(0.0)
        run_sum = run_sum * rescale + w.sum(1, keepdim=True)
        acc = acc * rescale + w @ y
        run_max = new_max
    return (acc / run_sum).reshape(x.shape).to(x.dtype)


class EmpiricalOptimalDenoiser:
    """Closed-form D*(x; sigma) of training images (N, C, H, W) in [-1, 1]; callable like a trained denoiser.

    With train_labels, a class-conditional model's optimum: the softmax runs over images of the same label.

    The same D* as optimal_denoiser (the plain computation) to float rounding, cheaper, in two ways:

    1. Fewer passes over the (batch x chunk) logits: the training images are stored once as rows
       [y, |y|^2, 1], so one GEMM with rows [-x / sigma^2, 1 / (2 sigma^2), 0] gives
       s = (||x - y||^2 - |x|^2) / (2 sigma^2) (softmax ignores the row constant), and the second GEMM,
       w @ [y, |y|^2, 1], gives the weighted sum and the sum of the weights together.
    2. No softmax at all for a sample whose weights are provably concentrated on one training image y_n
       (every other weight below 1e-12 of w_n): D* is y_n itself, up to relative 1e-12, far below float32
       rounding. A sampler walks each x towards the training image it converges on: after D* = y_n, the
       Euler and Heun steps put the next x on the segment from x to y_n, where the weights are even more
       concentrated. So every softmax leaves a hint per batch row: the nearest image n, e0 = x - y_n and
       a lower bound g0 on ||x - y_m||^2 - ||x - y_n||^2 over all other images m of the row's class (its
       two smallest squared distances less a worst-case rounding bound). A later call takes y_n for that
       row only when its x = y_n + r e0 + (a part of length eps orthogonal to e0), 0 <= r <= 1, proves
       (triangle inequality, float64 on the given x)
           ||x - y_m||^2 - ||x - y_n||^2 >= r g0 - 2 eps sqrt(r^2 |e0|^2 + r g0) > 2 sigma^2 ln((M - 1) 1e12)
       for every m, which is the concentration criterion. Nothing is assumed about the caller: a hint of
       another batch or trajectory just fails the check. Hints are kept for one batch at a time (dropped
       when the batch size changes or sigma grows), so diffmem.edm.edm_sampler, which calls D on one
       batch in order of decreasing sigma, gets the saving unchanged.
    bench/optimum.py measures both against the GEMM floor; tests/test_optimum_fast.py pins them equal."""

    def __init__(self, train_images: torch.Tensor, train_labels: torch.Tensor | None = None,
                 chunk_size: int = 8192, dtype: torch.dtype = torch.float32):
        self.shape = train_images.shape[1:]
        train = train_images.reshape(len(train_images), -1).to(dtype)
        m, dim = train.shape
        rows = -(-m // _BLOCK) * _BLOCK             # padded to whole blocks for _smallest
        ext = torch.zeros(rows, dim + 2, dtype=dtype, device=train.device)
        ext[:m, :dim] = train
        ext[:m, dim] = (train ** 2).sum(1)
        ext[:m, dim + 1] = 1
        ext[m:, dim] = torch.finfo(dtype).max       # padding rows score +inf: never a neighbour, weight 0
        self._ext = ext
        self.train, self.train_sq = ext[:m, :dim], ext[:m, dim]
        self.labels = None if train_labels is None else train_labels.to(train.device)
        self._ext_labels = None if train_labels is None else torch.cat(
            [self.labels, torch.full((rows - m,), -1, dtype=self.labels.dtype, device=train.device)])
        self.chunk_size, self.dtype = chunk_size, dtype
        # concentration: (M - 1) exp(-gap / (2 sigma^2)) < 1e-12
        self._log_ratio = math.log(max(m - 1, 1)) + 12 * math.log(10)
        # |error| of a computed gap ||x - y_m||^2 - ||x - y_n||^2, per unit of |x|^2 + 2 max |y|^2 (u: unit
        # roundoff): each score is a dot product of length D + 2, off by at most (D + 2) u times its sum of
        # |terms| <= (|x|^2 + 2 |y|^2) / (2 sigma^2), of inputs rounded by u (x / sigma^2) and D u (|y|^2);
        # a gap is the difference of two scores, times 2 sigma^2
        self._gap_err = 2 * (2 * dim + 4) * torch.finfo(dtype).eps / 2
        self._max_train_sq = self.train_sq.max().item() if m else 0.0
        self._log_floor = math.ceil(math.log(torch.finfo(dtype).tiny)) + 30   # -57 in float32
        self._hints = None

    def __call__(self, x: torch.Tensor, sigma, class_labels=None) -> torch.Tensor:
        flat = x.reshape(len(x), -1).to(device=self.train.device, dtype=self.dtype)
        sigma = torch.as_tensor(sigma, dtype=self.dtype, device=flat.device).reshape(-1, 1)
        labels = None
        if self.labels is not None and class_labels is not None:
            labels = class_labels.reshape(-1).to(flat.device)
        sigma = sigma.expand(len(flat), 1)
        reused, nearest = self._check_hints(x, sigma, labels)
        out = torch.empty_like(flat)
        out[reused] = self.train[nearest[reused]]
        rest = (~reused).nonzero().squeeze(1)
        if len(rest):
            sub_labels = None if labels is None else labels[rest]
            out[rest], first, gap = self._softmax(flat[rest], sigma[rest], sub_labels)
            self._store_hints(flat, rest, first, gap, sigma[rest])
        self._hints["sigma"] = sigma.max().item()
        return out.reshape(len(x), *self.shape).to(x.dtype)

    def _softmax(self, flat, sigma, labels):
        """D* of each row as optimal_denoiser, in two GEMMs and three passes per chunk (see the class docstring); also
        each row's nearest image and the gap of its two smallest squared distances (over its class)."""
        n, dim = flat.shape
        inv_var = 1 / sigma ** 2
        xa = torch.zeros(n, dim + 2, dtype=self.dtype, device=flat.device)
        torch.mul(flat, -inv_var, out=xa[:, :dim])
        xa[:, dim] = 0.5 * inv_var[:, 0]
        chunk = min(self.chunk_size, len(self._ext))
        buf = torch.empty(n * chunk, dtype=self.dtype, device=flat.device)
        acc = torch.zeros(n, dim + 2, dtype=self.dtype, device=flat.device)
        run_min = torch.full((n, 1), torch.inf, dtype=self.dtype, device=flat.device)
        best_s = torch.full((n, 2), torch.inf, dtype=self.dtype, device=flat.device)
        best_i = torch.zeros((n, 2), dtype=torch.long, device=flat.device)
        for start in range(0, len(self._ext), chunk):
            y = self._ext[start:start + chunk]
            s = torch.mm(xa, y.T, out=buf[:n * len(y)].view(n, len(y)))   # (|x - y|^2 - |x|^2) / (2 sigma^2)
            if labels is not None:
                s.masked_fill_(labels[:, None] != self._ext_labels[start:start + chunk], torch.inf)
            d, i = _smallest(s, min(2, len(y)))
            if start == 0:
                best_s[:, :d.shape[1]], best_i[:, :d.shape[1]] = d, i
            else:
                best_s, order = torch.topk(torch.cat([best_s, d], 1), 2, dim=1, largest=False)
                best_i = torch.cat([best_i, i + start], 1).gather(1, order)
            new_min = torch.minimum(run_min, d[:, :1])
            acc.mul_(torch.exp(new_min - run_min).nan_to_num_(0.0))      # 0 while a row had no candidate
            shift = torch.where(torch.isinf(new_min), 0.0, new_min)
            # tiny weights are raised to e^_log_floor: subnormal weights, or products w y, stall exp and the
            # GEMM (a 1e-38 weight made the GEMM 150x slower); the change is below M e^-57 of the sum
            w = torch.sub(shift, s, out=s).clamp_min_(self._log_floor).exp_()
            acc.addmm_(w, y)                                                   # sum_y w [y, |y|^2, 1]
            run_min = new_min
        out = acc[:, :dim] / acc[:, dim + 1:]
        gap = (best_s[:, 1] - best_s[:, 0]) * 2 * sigma[:, 0] ** 2
        return out, best_i[:, 0], gap

    # ------------------------------------------------------------------ hints of concentrated rows
    def _check_hints(self, x, sigma, labels):
        """Rows whose hint proves the weights concentrated at this x and sigma, and their image."""
        n, device = len(x), self.train.device
        h = self._hints
        if h is None or h["nearest"].shape[0] != n or sigma.max().item() > h["sigma"]:
            self._hints = {"nearest": torch.full((n,), -1, dtype=torch.long, device=device),
                           "e0": torch.zeros((n, self.train.shape[1]), dtype=torch.float64, device=device),
                           "e0_sq": torch.zeros(n, dtype=torch.float64, device=device),
                           "g0": torch.zeros(n, dtype=torch.float64, device=device), "sigma": math.inf}
            return torch.zeros(n, dtype=torch.bool, device=device), self._hints["nearest"]
        nearest, g0 = h["nearest"], h["g0"]
        reused = torch.zeros(n, dtype=torch.bool, device=device)
        need = 2 * sigma[:, 0].double() ** 2 * self._log_ratio
        rows = ((nearest >= 0) & (g0 > need)).nonzero().squeeze(1)   # lower <= r g0 <= g0: others fail
        if len(rows) == 0:
            return reused, nearest
        near, g0, need = nearest[rows], g0[rows], need[rows]
        e = x.reshape(n, -1)[rows].to(device=device, dtype=torch.float64) - self.train[near]
        e0, e0_sq = h["e0"][rows], h["e0_sq"][rows]
        r = (e * e0).sum(1) / e0_sq
        a_sq = r * r * e0_sq                                       # |r e0|^2
        eps = (torch.linalg.vector_norm(e, dim=1) ** 2 - a_sq).clamp_min(0).sqrt()   # part orthogonal to e0
        lower = r * g0 - 2 * eps * (a_sq + r * g0).clamp_min(0).sqrt()
        ok = (r >= 0) & (r <= 1) & (lower > need * (1 + 1e-9) + 1e-12 * (a_sq + r * g0))
        ok |= torch.isinf(g0)                                       # the only image of its class
        if labels is not None:
            ok &= self.labels[near] == labels[rows]
        reused[rows[ok]] = True
        return reused, nearest

    def _store_hints(self, flat, rows, first, gap, sigma):
        """Hints of rows just computed in full (see the class docstring). Only rows that can pass the check
        after sigma shrinks at most 100-fold keep one (r g0 > 2 sigma'^2 C, r = sigma'/sigma on the
        sampler's path, needs g0 > 2 sigma^2 C sigma'/sigma)."""
        h = self._hints
        x_sq = torch.linalg.vector_norm(flat[rows], dim=1).double() ** 2 * 1.001   # for the rounding bound
        g0 = gap.double() * (1 - 1e-6) - self._gap_err * (x_sq + 2 * self._max_train_sq)
        keep = g0 > 0.01 * 2 * sigma[:, 0].double() ** 2 * self._log_ratio
        h["nearest"][rows] = torch.where(keep, first, -1)
        rows, first = rows[keep], first[keep]
        e0 = flat[rows].double() - self.train[first]      # exactly, of the point whose distances we have
        h["g0"][rows], h["e0"][rows], h["e0_sq"][rows] = g0[keep], e0, (e0 * e0).sum(1)


def main(argv=None) -> int:
    """Sample the optimum of a config's training subset and print its memorization ratio."""
    from diffmem.cli import run_cli
    from diffmem.data import save_png, training_set
    from diffmem.evaluate import evaluate_denoiser
    from diffmem.sequential import ratio_interval
    from diffmem.pictures import nn_grid_picture

    def run(cfg, run_dir, writer):
        train_set = training_set(cfg.data)
        optimum = EmpiricalOptimalDenoiser(train_set.images, train_set.labels)   # conditional if cfg has labels
        result = evaluate_denoiser(optimum, train_set, cfg.eval)
        picture = nn_grid_picture(result, train_set)   # NN ratios under the columns, copies framed
        save_png(run_dir / "samples.png", picture)
        writer.add_image("samples/generated_nn1_nn2", picture, cfg.data.size, dataformats="HWC")
        samples = len(result.nn_ratio)
        low, high = ratio_interval(round(result.ratio * samples), samples)
        for name, value in (("mem_ratio", result.ratio), ("mem_ratio_low", low), ("mem_ratio_high", high)):
            writer.add_scalar(f"optimum/{name}", value, cfg.data.size)
        print(f"theoretical optimum |D|={cfg.data.size}: memorization ratio {result.ratio:.4f} [{low:.4f}, {high:.4f}] "
              f"(95 % Wilson interval over {samples} samples); grid: {run_dir / 'samples.png'}")
        return 0

    return run_cli("diffmem.optimum", "sample the theoretical optimum and print its memorization ratio", run, argv)


if __name__ == "__main__":   # through the imported module, so its exception classes are the ones caught
    from diffmem.optimum import main
    raise SystemExit(main())
