"""EDM (Karras et al. 2022): preconditioning, training loss and the deterministic Heun sampler.

D(x; sigma) = c_skip x + c_out F(c_in x; c_noise, label)            (EDM eq. 7, Table 1)
loss = lambda(sigma) ||D(y + n; sigma) - y||^2,  n ~ N(0, sigma^2 I)  (EDM eq. 8)
VP is the paper's basic setup; EDM its Fig. 1(c,d) and unique-label runs; VE (with NCSN++) its Fig. 4
(paper.md §4, §6, §8). Each preconditioning supports sigma in [sigma_min, sigma_max]; the sampler clamps
its schedule to that range, as EDM's generate.py does.
"""
from __future__ import annotations

import math

import torch


def _sigma_column(sigma, x):
    return torch.as_tensor(sigma, dtype=torch.float32, device=x.device).reshape(-1, 1, 1, 1).expand(x.shape[0], 1, 1, 1)


class Precond(torch.nn.Module):
    """D(x; sigma) = c_skip x + c_out F(c_in x; c_noise, label) (EDM eq. 7); a subclass gives scalings(sigma),
    the noise distribution of its loss (sample_sigma) and its weight lambda (loss_weight)."""

    def __init__(self, net):
        super().__init__()
        self.net = net

    def forward(self, x, sigma, class_labels=None):
        x = x.to(torch.float32)
        c_skip, c_out, c_in, c_noise = self.scalings(_sigma_column(sigma, x))
        return c_skip * x + c_out * self.net(c_in * x, c_noise.flatten(), class_labels)


class VPPrecond(Precond):
    """Variance preserving: sigma(t) = sqrt(exp(beta_d t^2 / 2 + beta_min t) - 1), t ~ U(eps_t, 1)."""
    beta_d, beta_min, M, epsilon_t = 19.9, 0.1, 1000, 1e-5

    def __init__(self, net):
        super().__init__(net)
        self.sigma_min = float(self.sigma(self.epsilon_t))   # ~0.0010
        self.sigma_max = float(self.sigma(1.0))              # ~152.2

    def sigma(self, t):
        t = torch.as_tensor(t, dtype=torch.float64)
        return ((0.5 * self.beta_d * t ** 2 + self.beta_min * t).exp() - 1).sqrt()

    def sigma_inv(self, sigma):
        sigma = torch.as_tensor(sigma)
        return ((self.beta_min ** 2 + 2 * self.beta_d * (1 + sigma ** 2).log()).sqrt() - self.beta_min) / self.beta_d

    def scalings(self, sigma):
        return 1, -sigma, 1 / (sigma ** 2 + 1).sqrt(), (self.M - 1) * self.sigma_inv(sigma)

    def sample_sigma(self, n, device, generator=None):
        t = self.epsilon_t + (1 - self.epsilon_t) * torch.rand(n, device=device, generator=generator)
        return self.sigma(t).to(torch.float32).to(device)

    def loss_weight(self, sigma):
        return 1 / sigma ** 2


class EDMPrecond(Precond):
    """EDM: sigma_data = 0.5, ln sigma ~ N(P_mean = -1.2, P_std = 1.2)."""
    sigma_data, P_mean, P_std = 0.5, -1.2, 1.2
    sigma_min, sigma_max = 0.0, math.inf

    def scalings(self, sigma):
        sd = self.sigma_data
        c_skip = sd ** 2 / (sigma ** 2 + sd ** 2)
        c_out = sigma * sd / (sigma ** 2 + sd ** 2).sqrt()
        c_in = 1 / (sd ** 2 + sigma ** 2).sqrt()
        return c_skip, c_out, c_in, sigma.log() / 4

    def sample_sigma(self, n, device, generator=None):
        return (torch.randn(n, device=device, generator=generator) * self.P_std + self.P_mean).exp()

    def loss_weight(self, sigma):
        return (sigma ** 2 + self.sigma_data ** 2) / (sigma * self.sigma_data) ** 2


class VEPrecond(Precond):
    """Variance exploding (NCSN++ runs, paper.md §8): sigma = sigma_min (sigma_max / sigma_min)^u, u ~ U(0, 1),
    lambda = 1 / sigma^2; c_skip = 1, c_out = sigma, c_in = 1, c_noise = ln(sigma / 2)."""
    sigma_min, sigma_max = 0.02, 100.0

    def scalings(self, sigma):
        return 1, sigma, 1, (0.5 * sigma).log()

    def sample_sigma(self, n, device, generator=None):
        u = torch.rand(n, device=device, generator=generator)
        return self.sigma_min * (self.sigma_max / self.sigma_min) ** u

    def loss_weight(self, sigma):
        return 1 / sigma ** 2


PRECONDITIONERS = {"vp": VPPrecond, "ve": VEPrecond, "edm": EDMPrecond}


def draw_noise(denoiser, shape, device, generator=None, shard=(0, 1)):
    """sigma ~ the preconditioning's training distribution and n ~ N(0, sigma^2 I) of EDM eq. 8 for a batch of
    `shape`, drawn from `generator` in this order (sigma, then n).

    shard=(rank, world): the batch is rows rank, rank + world, ... of a global batch of world x shape[0] (one DDP
    worker's share). sigma and n are drawn for the whole global batch and this shard's rows are kept, so with the
    same generator state on every rank each image gets the noise that one process training on the global batch
    draws for it (world = 1 is that process)."""
    rank, world = shard
    n = shape[0] * world
    sigma = denoiser.sample_sigma(n, device, generator)[rank::world].reshape(-1, 1, 1, 1)
    noise = torch.randn((n, *shape[1:]), device=device, generator=generator)[rank::world] * sigma
    return sigma, noise


def denoising_loss(denoiser, images, class_labels=None, generator=None, shard=(0, 1), drawn=None):
    """EDM eq. 8 per image: lambda(sigma) ||D(y + n; sigma) - y||^2, summed over pixels (EDM's loss.sum()).
    sigma and n are draw_noise's from `generator` and `shard`, or `drawn` = (sigma, n) drawn beforehand
    (diffmem/packed.py draws each training's own)."""
    sigma, noise = drawn if drawn is not None else draw_noise(denoiser, images.shape, images.device, generator, shard)
    denoised = denoiser(images + noise, sigma, class_labels)
    return (denoiser.loss_weight(sigma) * (denoised - images) ** 2).flatten(1).sum(1)


def noise_levels(num_steps=18, sigma_min=0.002, sigma_max=80.0, rho=7.0, device=None):
    """EDM eq. 5: t_i = (sigma_max^(1/rho) + i/(N-1) (sigma_min^(1/rho) - sigma_max^(1/rho)))^rho, t_N = 0."""
    i = torch.arange(num_steps, dtype=torch.float64, device=device)
    t = (sigma_max ** (1 / rho) + i / max(num_steps - 1, 1) * (sigma_min ** (1 / rho) - sigma_max ** (1 / rho))) ** rho
    return torch.cat([t, torch.zeros_like(t[:1])])


@torch.no_grad()
def edm_sampler(denoiser, latents, class_labels=None, num_steps=18, sigma_min=0.002, sigma_max=80.0, rho=7.0):
    """Deterministic Heun sampler (EDM Algorithm 1): 2N - 1 denoiser evaluations, 35 at N = 18.

    denoiser(x, sigma, class_labels) -> D(x; sigma); latents ~ N(0, I) are scaled by the first sigma here.
    The schedule keeps to the denoiser's supported range, as EDM's generate.py: sigma_min is raised to
    denoiser.sigma_min (VE: 0.02) and sigma_max lowered to denoiser.sigma_max where it has them.
    Returns float32 samples (nominally in [-1, 1])."""
    sigma_min = max(sigma_min, getattr(denoiser, "sigma_min", 0.0))
    sigma_max = min(sigma_max, getattr(denoiser, "sigma_max", math.inf))
    t_steps = noise_levels(num_steps, sigma_min, sigma_max, rho, latents.device)
    x_next = latents.to(torch.float64) * t_steps[0]
    for i, (t_cur, t_next) in enumerate(zip(t_steps[:-1], t_steps[1:])):
        x_cur = x_next
        d_cur = (x_cur - denoiser(x_cur, t_cur, class_labels).to(torch.float64)) / t_cur
        x_next = x_cur + (t_next - t_cur) * d_cur                       # Euler step
        if i < num_steps - 1:                                           # Heun correction, not at sigma = 0
            d_prime = (x_next - denoiser(x_next, t_next, class_labels).to(torch.float64)) / t_next
            x_next = x_cur + (t_next - t_cur) * (0.5 * d_cur + 0.5 * d_prime)
    return x_next.to(torch.float32)
