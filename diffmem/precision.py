"""Arithmetic precision of training (`train.precision`) and of evaluation (always exact fp32).

The paper trains in fp32 with TF32 disabled (paper.md §6), which is the default here. PyTorch enables TF32 for
cuDNN convolutions by default, so fp32 must switch it off explicitly.

    fp32   IEEE float32: torch.backends.cuda.matmul.allow_tf32 = cudnn.allow_tf32 = False
    tf32   the same flags True: float32 tensors, TF32 tensor-core matmuls and convolutions (Ampere and later);
           on a CPU these flags do nothing, so tf32 trains as fp32 there
    bf16   torch.autocast(bfloat16) around the forward pass and the loss only; parameters, gradients, Adam and
           the EMA stay float32, TF32 stays off; no loss scaling (bf16 has float32's exponent range)

Evaluation (sampling and nearest-neighbour distances) runs under `full_precision`: autocast off and TF32 off,
whatever the training used, so a memorization ratio means the same for every setting. The flags are
process-wide; each context manager restores what it found.
"""
from __future__ import annotations

import contextlib

import torch

PRECISIONS = ("fp32", "tf32", "bf16")


def tf32_flags() -> tuple[bool, bool]:
    return torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32


@contextlib.contextmanager
def tf32(allowed: bool):
    """Allow (or forbid) TF32 in CUDA matmuls and cuDNN convolutions inside the block."""
    before = tf32_flags()
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = allowed
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = before


def training_precision(precision: str):
    """The process-wide flags of a training: TF32 only for 'tf32'."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision={precision!r} is not one of {', '.join(PRECISIONS)}")
    return tf32(precision == "tf32")


def autocast(precision: str, device: torch.device):
    """Around the forward pass and loss of a training step: bfloat16 autocast for 'bf16', nothing otherwise."""
    if precision == "bf16":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


@contextlib.contextmanager
def full_precision(device: torch.device | str):
    """Exact float32: no autocast, no TF32 (memorization distances on the 0..255 scale need all 24 bits)."""
    device_type = torch.device(device).type
    with tf32(False), torch.autocast(device_type, enabled=False):
        yield
