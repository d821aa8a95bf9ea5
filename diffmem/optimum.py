"""The theoretical optimum (paper §2): the denoiser of the empirical training distribution.

D*(x; sigma) = sum_n w_n y_n,  w = softmax_n(-||x - y_n||^2 / (2 sigma^2))
It minimises the denoising loss on the training set exactly, and sampling it with the EDM sampler can
only reproduce training images. Computed in chunks over the training set with a streaming softmax
(running max and sum), so memory is bounded by batch x chunk, not batch x |D|.

    python -m diffmem.optimum --config experiments/digits.yaml --set data.size=64
"""
from __future__ import annotations

import torch


class EmpiricalOptimalDenoiser:
    """Closed-form D*(x; sigma) of training images (N, C, H, W) in [-1, 1]; callable like a trained denoiser.

    With train_labels, a class-conditional model's optimum: the softmax runs over images of the same label."""

    def __init__(self, train_images: torch.Tensor, train_labels: torch.Tensor | None = None,
                 chunk_size: int = 8192, dtype: torch.dtype = torch.float32):
        self.shape = train_images.shape[1:]
        self.train = train_images.reshape(len(train_images), -1).to(dtype)
        self.train_sq = (self.train ** 2).sum(1)
        self.labels = None if train_labels is None else train_labels.to(self.train.device)
        self.chunk_size, self.dtype = chunk_size, dtype

    def __call__(self, x: torch.Tensor, sigma, class_labels=None) -> torch.Tensor:
        flat = x.reshape(len(x), -1).to(device=self.train.device, dtype=self.dtype)
        sigma = torch.as_tensor(sigma, dtype=self.dtype, device=flat.device).reshape(-1, 1)
        inv_two_var = 1 / (2 * sigma ** 2)
        x_sq = (flat ** 2).sum(1, keepdim=True)
        run_max = torch.full((len(flat), 1), -torch.inf, dtype=self.dtype, device=flat.device)
        run_sum = torch.zeros_like(run_max)
        acc = torch.zeros_like(flat)
        for start in range(0, len(self.train), self.chunk_size):
            y, y_sq = self.train[start:start + self.chunk_size], self.train_sq[start:start + self.chunk_size]
            logits = -(x_sq - 2 * flat @ y.T + y_sq).clamp_min(0) * inv_two_var
            if self.labels is not None and class_labels is not None:
                other = class_labels.reshape(-1, 1).to(flat.device) != self.labels[start:start + self.chunk_size]
                logits = logits.masked_fill(other, -torch.inf)
            new_max = torch.maximum(run_max, logits.amax(1, keepdim=True))
            rescale = torch.exp(run_max - new_max).nan_to_num(0.0)    # exp(-inf - -inf) on an empty start
            w = torch.exp(logits - new_max).nan_to_num(0.0)
            run_sum = run_sum * rescale + w.sum(1, keepdim=True)
            acc = acc * rescale + w @ y
            run_max = new_max
        return (acc / run_sum).reshape(len(x), *self.shape).to(x.dtype)


def main(argv=None) -> int:
    """Sample the optimum of a config's training subset and print its memorization ratio."""
    from diffmem.cli import run_cli
    from diffmem.data import grid_array, save_grid, training_set
    from diffmem.evaluate import evaluate_denoiser, nn_grid_rows

    def run(cfg, run_dir, writer):
        train_set = training_set(cfg.data)
        optimum = EmpiricalOptimalDenoiser(train_set.images, train_set.labels)   # conditional if cfg has labels
        result = evaluate_denoiser(optimum, train_set, cfg.eval)
        rows = nn_grid_rows(result, train_set)
        save_grid(run_dir / "samples.png", rows)
        writer.add_scalar("optimum/mem_ratio", result.ratio, cfg.data.size)
        writer.add_image("samples/generated_nn1_nn2", grid_array(rows), cfg.data.size, dataformats="HWC")
        print(f"theoretical optimum |D|={cfg.data.size}: memorization ratio {result.ratio:.4f} "
              f"({cfg.eval.num_samples} samples); grid: {run_dir / 'samples.png'}")
        return 0

    return run_cli("diffmem.optimum", "sample the theoretical optimum and print its memorization ratio", run, argv)


if __name__ == "__main__":   # through the imported module, so its exception classes are the ones caught
    from diffmem.optimum import main
    raise SystemExit(main())
