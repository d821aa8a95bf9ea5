"""The fast theoretical optimum (EmpiricalOptimalDenoiser) changes nothing: same D* as the plain computation
(optimal_denoiser) and the brute-force formula, same samples, same memorization ratio."""
import pytest
import torch

from diffmem.config import DataConfig, EvalConfig
from diffmem.data import training_set
from diffmem.edm import edm_sampler
from diffmem.evaluate import evaluate_denoiser
from diffmem.optimum import EmpiricalOptimalDenoiser, optimal_denoiser


def brute_force_optimum(train, x, sigma, train_labels=None, labels=None):
    y = train.reshape(len(train), -1).double()
    d2 = ((x.reshape(len(x), -1).double()[:, None, :] - y[None]) ** 2).sum(-1)
    logits = -d2 / (2 * sigma ** 2)
    if labels is not None:
        logits = logits.masked_fill(labels[:, None] != train_labels[None], -torch.inf)
    return (torch.softmax(logits, dim=1) @ y).reshape(x.shape)


def plain_optimum(train, labels=None, dtype=torch.float32, chunk_size=8192):
    """optimal_denoiser as a denoiser callable, D(x, sigma, class_labels)."""
    train = train.to(dtype)
    return lambda x, sigma, class_labels=None: optimal_denoiser(x, sigma, train, labels, class_labels, chunk_size)


def test_the_plain_optimum_is_the_formula():
    train, labels = random_training_set(50, labels=True)
    x, cls = torch.randn(6, 3, 8, 8, dtype=torch.float64) * 0.4, torch.tensor([0, 1, 2, 3, 4, 0])
    for sigma in (3.0, 0.3, 0.05):
        torch.testing.assert_close(plain_optimum(train, dtype=torch.float64, chunk_size=16)(x, sigma),
                                   brute_force_optimum(train, x, sigma))
        torch.testing.assert_close(plain_optimum(train, labels, torch.float64, 16)(x, sigma, cls),
                                   brute_force_optimum(train, x, sigma, labels, cls))


class Counting(EmpiricalOptimalDenoiser):
    """Counts the rows that went through the full softmax (the rest reused a concentrated answer)."""
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.full_rows = self.calls = 0

    def _softmax(self, flat, sigma, labels):
        self.full_rows += len(flat)
        return super()._softmax(flat, sigma, labels)

    def __call__(self, x, sigma, class_labels=None):
        self.calls += len(x)
        return super().__call__(x, sigma, class_labels)


def random_training_set(n=300, seed=0, labels=False):
    g = torch.Generator().manual_seed(seed)
    train = torch.rand(n, 3, 8, 8, generator=g) * 2 - 1
    train[n - 10:] = train[:10]                                   # exact duplicates: never concentrated
    return train, (torch.randint(0, 5, (n,), generator=g) if labels else None)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("sigma", [0.02, 0.05, 0.5, 5.0, 80.0])
def test_fast_softmax_matches_brute_force_formula(sigma, dtype):
    train, _ = random_training_set(37)
    x = train[:5] + sigma * torch.randn(5, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    for chunk in (8, 64, 8192):                                   # many chunks, one block, one chunk
        ours = EmpiricalOptimalDenoiser(train, chunk_size=chunk, dtype=dtype)(x.to(dtype), sigma)
        tol = 1e-9 if dtype == torch.float64 else 1e-5
        torch.testing.assert_close(ours.double(), brute_force_optimum(train, x, sigma), rtol=tol, atol=tol)


def test_fast_softmax_with_labels_and_a_class_of_one_image():
    train, labels = random_training_set(60, labels=True)
    labels[7] = 9                                                  # class 9 holds one image: D* is that image
    x = torch.randn(12, 3, 8, 8) * 0.3
    cls = torch.tensor([0, 1, 2, 3, 4, 9] * 2)
    fast = EmpiricalOptimalDenoiser(train, labels, dtype=torch.float64)
    for sigma in (2.0, 0.5, 0.1, 0.05):                           # a trajectory of one batch: hints are used
        ref = brute_force_optimum(train, x, sigma, labels, cls)
        torch.testing.assert_close(fast(x.double(), sigma, cls).float(), ref.float(), rtol=1e-6, atol=1e-6)
        x = ref.float() + 0.5 * (x - ref.float())                  # towards D*, as a sampler step
    torch.testing.assert_close(fast(x.double(), 0.01, cls)[5::6].float(), train[7].expand(2, 3, 8, 8))


def sample_both(train, labels, latents, class_labels=None, **kwargs):
    plain = plain_optimum(train, labels, **kwargs)
    fast = Counting(train, labels, **kwargs)
    return edm_sampler(plain, latents, class_labels), edm_sampler(fast, latents, class_labels), fast


@pytest.mark.parametrize("conditional", [False, True])
def test_fast_sampler_gives_the_same_samples_on_random_data(conditional):
    train, labels = random_training_set(300, labels=conditional)
    g = torch.Generator().manual_seed(2)
    latents = torch.randn(64, 3, 8, 8, generator=g)
    cls = torch.randint(0, 5, (64,), generator=g) if conditional else None
    plain, fast, counting = sample_both(train, labels, latents, cls, chunk_size=128)   # 3 chunks, ragged
    torch.testing.assert_close(fast, plain, rtol=1e-5, atol=1e-5)
    assert counting.full_rows < 0.9 * counting.calls              # the fast path did skip work


def test_fast_optimum_gives_the_same_samples_and_ratio_on_digits():
    ts = training_set(DataConfig(size=500))
    cfg = EvalConfig(num_samples=200, batch_size=100)
    plain = evaluate_denoiser(plain_optimum(ts.images), ts, cfg)
    counting = Counting(ts.images)
    fast = evaluate_denoiser(counting, ts, cfg)                   # through edm_sampler, two batches
    torch.testing.assert_close(fast.samples, plain.samples, rtol=1e-5, atol=1e-5)
    assert fast.ratio == plain.ratio and torch.equal(fast.nn_index, plain.nn_index)
    assert counting.full_rows < 0.9 * counting.calls


def test_conditional_digits_ratio_is_unchanged():
    ts = training_set(DataConfig(size=200, labels="random", label_classes=20))
    cfg = EvalConfig(num_samples=100, batch_size=100)
    plain = evaluate_denoiser(plain_optimum(ts.images, ts.labels), ts, cfg)
    fast = evaluate_denoiser(EmpiricalOptimalDenoiser(ts.images, ts.labels), ts, cfg)
    torch.testing.assert_close(fast.samples, plain.samples, rtol=1e-5, atol=1e-5)
    assert fast.ratio == plain.ratio


def test_hints_never_answer_for_another_point():
    """A hint is checked against the x it is asked about: other points, another batch, labels that changed
    or a sigma that grew all get the full softmax."""
    train, labels = random_training_set(300, labels=True)
    train = train.double()                                         # float64: midpoints are well conditioned
    g = torch.Generator().manual_seed(3)
    x = train[10:42] + 0.01 * torch.randn(32, 3, 8, 8, generator=g, dtype=torch.float64)   # no duplicates
    fast = Counting(train, labels, dtype=torch.float64)
    plain = plain_optimum(train, labels, torch.float64)
    cls = labels[10:42]
    fast(x, 0.05, cls)
    fast(x, 0.05, cls)
    assert fast.full_rows == 32                                    # the second call reused every row
    moved = torch.cat([train[100:116] + 0.01 * torch.randn(16, 3, 8, 8, generator=g, dtype=torch.float64),
                       x[16:]])   # half moved elsewhere
    torch.testing.assert_close(fast(moved, 0.04, cls), plain(moved, 0.04, cls))
    assert fast.full_rows == 48
    other_cls = (cls + 1) % 5                                      # other labels: other softmax sets
    torch.testing.assert_close(fast(moved, 0.03, other_cls), plain(moved, 0.03, other_cls))
    for sigma in (0.02, 3.0):                                      # sigma grew: a new trajectory
        torch.testing.assert_close(fast(moved, sigma, cls), plain(moved, sigma, cls))
    fast(moved, 0.02, cls)                                         # hints again on this trajectory
    # midpoints between each row's image and another image of its class: off the segment towards y_n, where
    # D* is the average of the two; a reused hint would answer y_n
    mates = torch.tensor([next(j for j in range(100, 290) if labels[j] == c) for c in cls.tolist()])
    mid = (train[10:42] + train[mates]) / 2
    assert (fast._hints["nearest"] >= 0).all()                     # every row has a hint, none may apply
    before = fast.full_rows
    out = fast(mid, 0.01, cls)
    assert fast.full_rows == before + 32
    torch.testing.assert_close(out, plain(mid, 0.01, cls))
    torch.testing.assert_close(out, mid, rtol=0, atol=0.01)
