"""The memorization criterion (paper §1): a generated image x is a copy when
||x - NN1|| / ||x - NN2|| < 1/3, with NN1, NN2 its nearest and second-nearest training images in flattened
pixel space. The memorization ratio is the share of generated images that are copies.
Its 95 % interval over the samples is diffmem.sequential.ratio_interval (statistics without torch).

Exact nearest neighbours by matrix multiplication, ||a - b||^2 = ||a||^2 - 2 a.b + ||b||^2, in chunks over
both sets so memory is bounded by the chunk sizes, never by (#generated x #train). bench/nn.py measures it
against a bare GEMM of the same shape, torch.cdist and faiss.
"""
from __future__ import annotations


import torch


def to_pixels(images: torch.Tensor) -> torch.Tensor:
    """[-1, 1] floats -> the 8-bit values the paper measures on (EDM's PNG export: x * 127.5 + 128)."""
    return (images * 127.5 + 128).clamp(0, 255).to(torch.uint8)


_BLOCK = 64   # columns per block of the block-min prefilter in _smallest
_WINNER_ROWS = 256   # generated rows per pass of the winners' direct distances (rows x k x D differences)


def _smallest(scores: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact k smallest entries of each row (values, column indices), ties in any order.

    The k smallest of a row lie in the k blocks (of _BLOCK columns) with the smallest minima, so a fast
    vectorised amin per block, a topk over the block minima and one over those k blocks replace a topk
    over the whole row (topk walks each row element by element; amin is several times cheaper)."""
    n, m = scores.shape
    if m % _BLOCK or m // _BLOCK <= k:
        return torch.topk(scores, k, dim=1, largest=False)
    blocks = scores.view(n, m // _BLOCK, _BLOCK)
    _, block = torch.topk(blocks.amin(2), k, dim=1, largest=False)
    candidates = blocks.gather(1, block[:, :, None].expand(n, k, _BLOCK)).reshape(n, k * _BLOCK)
    values, j = torch.topk(candidates, k, dim=1, largest=False)
    return values, block.gather(1, j // _BLOCK) * _BLOCK + j % _BLOCK


@torch.no_grad()
def nearest_neighbours(generated: torch.Tensor, train: torch.Tensor, k: int = 2,
                       chunk_generated: int = 2048, chunk_train: int = 2048):
    """Exact k nearest training images of each generated image: (distances (N, k), indices (N, k)).

    float32, both sets centred on the training mean (same distances, smaller norms, less cancellation).
    Per generated row only |t|^2 - 2 g.t decides the ranking (the k winners' distances are computed directly at
    the end), and it is one GEMM of augmented rows: [-2 g, 1] . [t, |t|^2]. So each (chunk_generated x chunk_train)
    block of scores is a single matmul into a reused buffer, followed by the block-min top-k of _smallest:
    no elementwise pass over the scores besides that. Extra memory: a centred copy of the generated images
    (N x (D + 1)), one train chunk (chunk_train x (D + 1)) and one score block
    (chunk_generated x chunk_train), then the winners' differences (256 x k x D); never
    (#generated x #train).
    """
    if len(train) < k:
        raise ValueError(f"need at least {k} training images for {k} nearest neighbours, got {len(train)}")
    out_device = generated.device
    train = train.reshape(len(train), -1).float()
    n, m, dim = len(generated), len(train), train.shape[1]
    mean = train.sum(0) / m
    gen = torch.empty(n, dim + 1, device=train.device)
    torch.sub(generated.reshape(n, -1).float().to(train.device), mean, out=gen[:, :dim])
    gen[:, :dim].mul_(-2)
    gen[:, dim] = 1
    # a train chunk is padded to whole blocks with rows that score +inf ([0, ..., 0, inf]): never chosen
    rows = min(chunk_train, m)
    padded = -(-rows // _BLOCK) * _BLOCK if rows >= 4 * _BLOCK else rows
    chunk = torch.empty(padded, dim + 1, device=train.device)
    score_buf = torch.empty(min(chunk_generated, n) * padded, device=train.device)
    best_d = torch.full((n, k), float("inf"), device=train.device)
    best_i = torch.zeros((n, k), dtype=torch.long, device=train.device)
    for start in range(0, m, rows):
        t = train[start:start + rows]
        used = len(t) if padded == rows else -(-len(t) // _BLOCK) * _BLOCK
        c = chunk[:used]
        torch.sub(t, mean, out=c[:len(t), :dim])
        c[:len(t), dim] = torch.linalg.vector_norm(c[:len(t), :dim], dim=1).square_()
        c[len(t):, :dim], c[len(t):, dim] = 0, float("inf")
        kk = min(k, used)
        for g0 in range(0, n, chunk_generated):
            g = gen[g0:g0 + chunk_generated]
            scores = score_buf[:len(g) * used].view(len(g), used)
            torch.mm(g, c.T, out=scores)
            d, i = _smallest(scores, kk)
            if start == 0:
                best_d[g0:g0 + len(g), :kk], best_i[g0:g0 + len(g), :kk] = d, i
            else:
                best_d[g0:g0 + len(g)], order = torch.topk(torch.cat([best_d[g0:g0 + len(g)], d], 1), k,
                                                           dim=1, largest=False)
                best_i[g0:g0 + len(g)] = torch.cat([best_i[g0:g0 + len(g)], i + start], 1).gather(1, order)
    # The winners' distances directly, ||g - t||, not from the ranking's |g|^2 - 2 g.t + |t|^2: that cancels to
    # float32 noise for a near copy (sqrt of the noise instead of ~0) and its rounding depends on how the GEMM
    # blocked the rows, so the same sample in another evaluation batch would get another ratio. The k winners
    # are then ordered by these distances (a tie within the ranking's rounding could have swapped them).
    dists = torch.empty(n, k, device=train.device)
    for g0 in range(0, n, _WINNER_ROWS):
        g = generated[g0:g0 + _WINNER_ROWS].reshape(-1, 1, dim).float().to(train.device)
        dists[g0:g0 + len(g)] = torch.linalg.vector_norm(g - train[best_i[g0:g0 + len(g)]], dim=2)
    dists, order = torch.sort(dists, dim=1, stable=True)
    return dists.to(out_device), best_i.gather(1, order).to(out_device)


def nn_ratio_from_distances(distances: torch.Tensor) -> torch.Tensor:
    """(N, 2) distances to NN1, NN2 -> ||x - NN1|| / ||x - NN2|| (0 for an exact copy, ~1 for a new image)."""
    return distances[:, 0] / distances[:, 1].clamp_min(torch.finfo(distances.dtype).tiny)


def nn_ratio(generated: torch.Tensor, train: torch.Tensor, **chunks) -> torch.Tensor:
    """Per generated image, its NN ratio ||x - NN1|| / ||x - NN2|| (paper.md §1)."""
    return nn_ratio_from_distances(nearest_neighbours(generated, train, k=2, **chunks)[0])


def is_copy(ratio, threshold: float = 1 / 3):
    """The criterion (paper.md §1): a generated image is a copy when its NN ratio is strictly below the threshold.
    Elementwise on a tensor of ratios, or on one float."""
    return ratio < threshold


def memorization_ratio(generated: torch.Tensor, train: torch.Tensor, threshold: float = 1 / 3, **chunks) -> float:
    """Share of generated images that are copies."""
    return is_copy(nn_ratio(generated, train, **chunks), threshold).float().mean().item()


