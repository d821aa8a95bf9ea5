"""Tests that pin the science: sampler, theoretical optimum, memorization ratio, subsets and labels."""
import math

import numpy as np
import pytest
import torch

from diffmem.config import DataConfig, EvalConfig, load_config
from diffmem.data import balanced_order, load_dataset, training_set
from diffmem.edm import EDMPrecond, VPPrecond, edm_sampler
from diffmem.evaluate import evaluate_denoiser
from diffmem.memorization import memorization_ratio, nn_ratio, nearest_neighbours
from diffmem.optimum import EmpiricalOptimalDenoiser


# ---------------------------------------------------------------- sampler
def reference_heun(D, x_T, N=18, s_min=0.002, s_max=80.0, rho=7.0):
    """EDM Algorithm 1, written from the paper independently of diffmem.edm (Python floats per step)."""
    sig = [(s_max ** (1 / rho) + i / (N - 1) * (s_min ** (1 / rho) - s_max ** (1 / rho))) ** rho for i in range(N)]
    sig.append(0.0)
    x = x_T.double() * sig[0]
    calls = 0
    for i in range(N):
        d = (x - D(x, sig[i]).double()) / sig[i]
        calls += 1
        x_new = x + (sig[i + 1] - sig[i]) * d
        if sig[i + 1] != 0:
            d2 = (x_new - D(x_new, sig[i + 1]).double()) / sig[i + 1]
            calls += 1
            x_new = x + (sig[i + 1] - sig[i]) * (d + d2) / 2
        x = x_new
    return x.float(), calls


def test_sampler_matches_algorithm_1_and_uses_35_evaluations():
    torch.manual_seed(0)
    W = torch.randn(16, 16) * 0.1

    calls = []

    def denoiser(x, sigma, labels):   # a smooth nonlinear stand-in for a network
        calls.append(1)
        s = torch.as_tensor(sigma, dtype=torch.float64)
        return torch.tanh(x.reshape(len(x), -1) @ W.double()).reshape(x.shape) / (1 + s)

    latents = torch.randn(4, 1, 4, 4)
    ours = edm_sampler(denoiser, latents)
    assert len(calls) == 35
    ref, ref_calls = reference_heun(lambda x, s: denoiser(x, s, None), latents)
    assert ref_calls == 35
    torch.testing.assert_close(ours, ref, rtol=1e-6, atol=1e-6)


def test_vp_and_edm_preconditioning_match_table_1():
    net_out = torch.randn(2, 1, 8, 8)
    net = lambda x, c_noise, labels: net_out   # noqa: E731  (isolate the c_* coefficients)
    x = torch.randn(2, 1, 8, 8)
    vp, edm = VPPrecond(net), EDMPrecond(net)
    sigma = torch.tensor([0.5, 3.0])
    s = sigma.reshape(-1, 1, 1, 1)
    torch.testing.assert_close(vp(x, sigma), x - s * net_out)                                   # c_skip 1, c_out -sigma
    c_skip, c_out = 0.25 / (s ** 2 + 0.25), s * 0.5 / (s ** 2 + 0.25).sqrt()
    torch.testing.assert_close(edm(x, sigma), c_skip * x + c_out * net_out)
    assert math.isclose(vp.sigma_min, 0.0010, rel_tol=0.05) and math.isclose(vp.sigma_max, 152.17, rel_tol=1e-3)
    t = torch.tensor([0.3, 0.9], dtype=torch.float64)
    torch.testing.assert_close(vp.sigma_inv(vp.sigma(t)), t)


# ---------------------------------------------------------------- theoretical optimum
def brute_force_optimum(train, x, sigma):
    y = train.reshape(len(train), -1).double()
    xs = x.reshape(len(x), -1).double()
    d2 = ((xs[:, None, :] - y[None]) ** 2).sum(-1)
    w = torch.softmax(-d2 / (2 * sigma ** 2), dim=1)
    return (w @ y).reshape(x.shape)


@pytest.mark.parametrize("sigma", [0.05, 0.5, 5.0, 80.0])
def test_optimal_denoiser_matches_brute_force_formula(sigma):
    torch.manual_seed(1)
    train = torch.rand(37, 3, 8, 8) * 2 - 1
    x = train[:5] + sigma * torch.randn(5, 3, 8, 8)
    ours = EmpiricalOptimalDenoiser(train, chunk_size=8, dtype=torch.float64)(x.double(), sigma)  # 5 chunks
    torch.testing.assert_close(ours, brute_force_optimum(train, x, sigma), rtol=1e-9, atol=1e-9)


def test_optimal_denoiser_with_labels_averages_within_class():
    train = torch.tensor([[-1.0], [1.0], [0.5]]).reshape(3, 1, 1, 1)
    labels = torch.tensor([0, 1, 1])
    D = EmpiricalOptimalDenoiser(train, labels, dtype=torch.float64)
    out = D(torch.zeros(1, 1, 1, 1, dtype=torch.float64), 100.0, torch.tensor([0]))
    assert out.item() == pytest.approx(-1.0)                  # only class 0's image can be the answer


def test_theoretical_optimum_reproduces_training_images_on_digits():
    cfg = load_config(None, {"data.size": 200, "eval.num_samples": 200, "eval.batch_size": 200})
    ts = training_set(cfg.data)
    result = evaluate_denoiser(EmpiricalOptimalDenoiser(ts.images), ts, cfg.eval)
    assert result.ratio >= 0.99
    assert result.samples.shape == (200, 1, 8, 8)


# ---------------------------------------------------------------- memorization ratio
def test_memorization_ratio_on_hand_made_cases():
    train = torch.tensor([[0.0, 0.0], [10.0, 0.0], [0.0, 30.0]])
    copy = train[1:2] + torch.tensor([[0.01, 0.0]])              # a near copy of image 1
    midpoint = (train[0:1] + train[1:2]) / 2                     # equidistant from images 0 and 1: ratio 1
    ratios = nn_ratio(torch.cat([copy, midpoint]), train)
    assert ratios[0] < 0.01 and ratios[1] == pytest.approx(1.0)
    assert memorization_ratio(torch.cat([copy, midpoint]), train) == 0.5
    # strictly below the threshold: a point with ratio exactly 1/3 does not count
    line = torch.tensor([[0.0, 0.0], [4.0, 0.0], [-4.0, 0.0]])
    edge = torch.tensor([[1.0, 0.0]])                            # d1 = 1, d2 = 3: ratio exactly 1/3
    assert nn_ratio(edge, line)[0].item() == pytest.approx(1 / 3)
    assert memorization_ratio(edge, line, threshold=1 / 3) == 0.0
    assert memorization_ratio(edge, line, threshold=0.34) == 1.0


def test_chunked_nearest_neighbours_are_exact():
    torch.manual_seed(2)
    train, gen = torch.randn(300, 50), torch.randn(70, 50)
    d, i = nearest_neighbours(gen, train, k=2, chunk_generated=16, chunk_train=32)
    full = torch.cdist(gen.double(), train.double())
    ref_d, ref_i = torch.topk(full, 2, dim=1, largest=False)
    assert torch.equal(i, ref_i)
    torch.testing.assert_close(d.double(), ref_d, rtol=1e-4, atol=1e-4)



def test_nearest_neighbour_distances_do_not_depend_on_how_the_samples_are_batched():
    """The same generated image gets the same distances, bit for bit, alone, in a batch of 3 or of 250 (an
    evaluation's adaptive looks and its fixed batches, diffmem/evaluate.py); a near copy's distance is its
    direct difference (0.01 here), not the ranking's cancelling expansion."""
    torch.manual_seed(4)
    train = torch.rand(500, 3, 8, 8) * 2 - 1
    gen = torch.cat([torch.rand(240, 3, 8, 8) * 2 - 1, train[:10] + 0.01 / (3 * 64) ** 0.5])
    d_all, i_all = nearest_neighbours(gen, train, k=2, chunk_train=128)
    for size in (1, 3, 7):
        parts = [nearest_neighbours(gen[j:j + size], train, k=2, chunk_train=128) for j in range(0, len(gen), size)]
        assert torch.equal(torch.cat([d for d, _ in parts]), d_all)
        assert torch.equal(torch.cat([i for _, i in parts]), i_all)
    torch.testing.assert_close(d_all[240:, 0], torch.full((10,), 0.01), rtol=1e-4, atol=0)
    assert torch.equal(i_all[240:, 0], torch.arange(10))


def reference_neighbours(gen, train, k):
    """Plain float64 torch.cdist + sort: the definition the fast path must reproduce."""
    d2 = torch.cdist(gen.double().reshape(len(gen), -1), train.double().reshape(len(train), -1)) ** 2
    return d2, torch.sort(d2, dim=1).values[:, :k]


@pytest.mark.parametrize("k", [1, 2, 3])
@pytest.mark.parametrize("chunks", [{}, {"chunk_generated": 48, "chunk_train": 300},
                                    {"chunk_train": 333},          # a last chunk of 1 image, padded to 64
                                    {"chunk_train": 7}])
def test_fast_nearest_neighbours_equal_cdist_with_ties_and_duplicates(k, chunks):
    """Integer data in few dimensions: many exact ties, exact duplicates in both sets and exact copies.
    Squared distances are small integers, so float32 must rank them exactly: every returned index must
    have the reference's k-th smallest squared distance (any of tied indices is right)."""
    gen_ = torch.Generator().manual_seed(k)
    train = torch.randint(0, 4, (1000, 6), generator=gen_).float()
    train[900:] = train[:100]                                              # duplicated training images
    gen = torch.cat([torch.randint(0, 4, (150, 6), generator=gen_).float(), train[:30], train[950:960]])
    gen = torch.cat([gen, gen[:20]])                                       # duplicated generated images
    d, i = nearest_neighbours(gen, train, k=k, **chunks)
    full, ref = reference_neighbours(gen, train, k)
    assert i.shape == (len(gen), k) and d.dtype == torch.float32
    assert torch.equal(full.gather(1, i), ref)                            # right neighbours, ties in any order
    assert all(len(set(row)) == k for row in i.tolist())                  # k distinct training images
    torch.testing.assert_close(d.double() ** 2, ref, rtol=1e-6, atol=0)   # exact copies at exactly 0


def test_fast_nearest_neighbours_equal_cdist_on_random_pixels():
    """Continuous data at pixel scale, ragged chunks, two block shapes: same indices and ratios as cdist."""
    torch.manual_seed(3)
    train = torch.rand(1500, 3, 8, 8) * 255
    gen = torch.cat([torch.rand(200, 3, 8, 8) * 255, train[:50] + torch.randn(50, 3, 8, 8)])
    full, ref = reference_neighbours(gen, train, 2)
    ref_i = torch.sort(full, dim=1).indices[:, :2]
    for chunks in [{}, {"chunk_generated": 100, "chunk_train": 512}]:
        d, i = nearest_neighbours(gen, train, k=2, **chunks)
        assert torch.equal(i, ref_i)
        # the winners' distances are direct float32 differences, not the ranking's cancelling expansion
        torch.testing.assert_close(d.double() ** 2, ref, rtol=1e-5, atol=0)
        ratio_ref = (ref[:, 0].sqrt() / ref[:, 1].sqrt() < 1 / 3).double().mean().item()
        assert memorization_ratio(gen, train, **chunks) == pytest.approx(ratio_ref)


# ---------------------------------------------------------------- subsets and labels
def test_subsets_are_nested_and_class_balanced():
    cfg = DataConfig(size=300)
    small, big = training_set(cfg), training_set(DataConfig(size=1000))
    assert np.array_equal(big.indices[:300], small.indices)
    labels = load_dataset(cfg).labels
    counts = np.bincount(labels[small.indices], minlength=10)
    assert counts.max() - counts.min() <= 0 and counts.sum() == 300
    counts = np.bincount(labels[training_set(DataConfig(size=305)).indices], minlength=10)
    assert counts.max() - counts.min() == 1
    seeded = training_set(DataConfig(size=300, seed=5)).indices
    assert not np.array_equal(seeded, small.indices)
    assert np.array_equal(seeded, training_set(DataConfig(size=1000, seed=5)).indices[:300])
    assert np.array_equal(seeded, training_set(DataConfig(size=300, seed=5)).indices)   # reproducible


def test_balanced_order_interleaves_classes():
    labels = np.array([1, 1, 0, 1, 0, 2])
    assert labels[balanced_order(labels)].tolist() == [0, 1, 2, 0, 1, 1]


def test_first_classes_only():
    ts = training_set(DataConfig(size=100, num_classes=2, labels="true"))
    assert set(ts.labels.tolist()) == {0, 1} and ts.label_dim == 2


def test_random_labels_are_fixed_per_image_and_unique_labels_are_indices():
    a = training_set(DataConfig(size=200, labels="random", label_classes=7))
    b = training_set(DataConfig(size=500, labels="random", label_classes=7))
    assert a.label_dim == 7 and torch.equal(a.labels, b.labels[:200])   # an image keeps its label
    assert set(b.labels.tolist()) == set(range(7))
    true = load_dataset(DataConfig()).labels[a.indices]
    assert (a.labels.numpy() != true).mean() > 0.5                       # uninformative, not the true class
    u = training_set(DataConfig(size=50, labels="unique"))
    assert u.label_dim == 50 and u.labels.tolist() == list(range(50))
    n = training_set(DataConfig(size=50, labels="none"))
    assert n.labels is None and n.label_dim == 0


def test_images_are_scaled_to_unit_range():
    ts = training_set(DataConfig(size=1797))
    assert ts.images.min() == -1.0 and ts.images.max() == 1.0 and ts.images.dtype == torch.float32


def test_evaluation_samples_depend_only_on_their_seed():
    ts = training_set(DataConfig(size=50))
    D = EmpiricalOptimalDenoiser(ts.images)
    a = evaluate_denoiser(D, ts, EvalConfig(num_samples=6, batch_size=6, num_steps=4))
    b = evaluate_denoiser(D, ts, EvalConfig(num_samples=4, batch_size=3, num_steps=4))
    torch.testing.assert_close(a.samples[:4], b.samples)


def test_conditional_samples_use_only_classes_of_the_subset():
    ts = training_set(DataConfig(size=30, labels="random", label_classes=100))
    present = set(ts.labels.tolist())
    seen = []
    D = EmpiricalOptimalDenoiser(ts.images, ts.labels)
    D_call = D.__call__

    def spy(x, sigma, class_labels=None):
        seen.extend(class_labels.tolist())
        return D_call(x, sigma, class_labels)
    result = evaluate_denoiser(spy, ts, EvalConfig(num_samples=64, batch_size=64, num_steps=4))
    assert set(seen) <= present and len(set(seen)) > 5
    assert result.ratio >= 0.99   # the class-conditional optimum also reproduces training images


def test_the_papers_class_draw_is_uniform_over_label_dim_and_the_same_draw_when_every_class_has_images():
    from diffmem.evaluate import sample_classes, seeded_latents
    sparse = training_set(DataConfig(size=30, labels="random", label_classes=100))
    _, labels = seeded_latents(range(400), (1, 8, 8), sample_classes(sparse, "all"), "cpu")
    # EDM's generate.py: torch.randint(label_dim) from the seed's generator, after its latent
    expected = []
    for seed in range(400):
        g = torch.Generator().manual_seed(seed)
        torch.randn((1, 8, 8), generator=g)
        expected.append(int(torch.randint(100, (), generator=g)))
    assert labels.tolist() == expected
    assert len(set(expected) - set(sparse.labels.tolist())) > 50   # most of them never trained on
    full = training_set(DataConfig(size=100, labels="true"))   # all 10 classes present
    assert torch.equal(seeded_latents(range(50), (1, 8, 8), sample_classes(full, "all"), "cpu")[1],
                       seeded_latents(range(50), (1, 8, 8), sample_classes(full, "present"), "cpu")[1])
