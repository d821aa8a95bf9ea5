"""The EMA of the weights: the per-step decay beta of each schedule (paper.md §6, train.ema_schedule).

After every optimizer step the EMA moves toward the network: ema <- beta * ema + (1 - beta) * net. All three
schedules use EDM's ramp-up, which caps the half-life h at `rampup` times the images seen *before* the step
(so the first step copies the network, beta = 0), and the paper's code (training/training_loop.py) evaluates
them with the same images-seen count:

- halflife (EDM; the paper's code ema_mode=mode1): beta = 0.5 ** (batch / min(h, rampup * seen)).
- paper (the paper's default, ema_mode=mode2): h is stretched by the data ratio 50000 / |D| and the batch
  in the exponent is fixed at 512: beta = 0.5 ** (512 / (min(h, rampup * seen) * 50000 / |D|)). With the
  paper's h = 0.5 |D| / 50 kimg = 10 epochs this is 0.5 ** (512 / 500000) = 0.99929 per step after the
  ramp-up, at every |D| and every batch size: the half-life EDM uses at 50k images, 500k images, at any |D|.
- paper_final (Table 3, ema_mode=mode4): beta = final / 0.5 ** (batch / 500000)
  * 0.5 ** (batch / (min(h, rampup * seen) * 50000 / |D|)), which reaches `final` after the ramp-up.

The paper's code stores h as whole kimg, int(0.5 |D| / 50); every |D| the paper trained is a multiple of 100,
where that is exactly 10 |D| images. diffmem keeps h = 10 |D| at every |D| (a bisection probes other sizes),
so beta = 0.99929 after the ramp-up everywhere, as the paper states (tests/test_ema.py).
"""
from __future__ import annotations

import math

SCHEDULES = ("paper", "paper_final", "halflife")
PAPER_BATCH = 512            # mode2's exponent: the paper's batch, whatever the batch actually is
PAPER_REFERENCE_SIZE = 50000  # the data ratio 50000 / |D|: CIFAR-10's size, EDM's half-life of 500 kimg there
PAPER_HALFLIFE = 500_000     # mode4's constant 0.5 ** (batch / 500 / 1000): EDM's 0.5 Mimg half-life


def ema_beta(schedule: str, halflife: float, rampup: float | None, batch: int, seen: int, size: int,
             final: float | None = None) -> float:
    """beta of the step taken after `seen` images. halflife: h in images; rampup: None for no ramp-up;
    size: |D|; final: paper_final's beta after the ramp-up."""
    h = min(halflife, seen * rampup) if rampup is not None else halflife
    h = max(h, 1e-8)   # EDM's guard: seen = 0 gives beta = 0
    if schedule == "halflife":
        return 0.5 ** (batch / h)
    data_ratio = PAPER_REFERENCE_SIZE / size
    if schedule == "paper":
        return 0.5 ** (PAPER_BATCH / h / data_ratio)
    if schedule == "paper_final":
        return final / 0.5 ** (batch / PAPER_HALFLIFE) * 0.5 ** (batch / h / data_ratio)
    raise ValueError(f"unknown EMA schedule {schedule!r}; one of {', '.join(SCHEDULES)}")


def rampup_end(halflife: float, rampup: float | None) -> int:
    """Images seen at which the ramp-up stops capping the half-life (0 without a ramp-up)."""
    return 0 if rampup is None else math.ceil(halflife / rampup)


def halflife_images(beta: float, batch: int) -> float:
    """The half-life in images of a per-step beta at this batch size: 0.5 = beta ** (images / batch)."""
    if beta <= 0:
        return 0.0
    return math.inf if beta >= 1 else batch * math.log(0.5) / math.log(beta)
