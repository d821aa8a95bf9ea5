"""NCSN++ with VE preconditioning (paper.md §4 Fig. 4, §8): the network, its skip mask with the residual
encoder, VE's schedule, loss weight and preconditioning, the sampler's range, the config keys, one real training."""
import math
import os
import subprocess
import sys

import pytest
import torch

from diffmem.config import ARCHITECTURES, ConfigError, load_config
from diffmem.edm import PRECONDITIONERS, VEPrecond, VPPrecond, denoising_loss, edm_sampler
from diffmem.networks import DownConv, SongUNet

NCSNPP = ARCHITECTURES["ncsnpp"]
# Same topology as the paper's (3 levels x 3 skips = 9), small enough for many forward passes.
NINE_SKIPS = dict(model_channels=16, channel_mult=(1, 2, 2), num_blocks=2, attn_resolutions=(8,), dropout=0.0,
                  **NCSNPP)
DIGITS = dict(model_channels=16, channel_mult=(1, 2), num_blocks=1, attn_resolutions=(), dropout=0.0, **NCSNPP)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def scramble(model, seed=0):
    """EDM's init leaves the residual branches and the output at 1e-5; make every path visibly matter."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.05)
    return model.eval()


def inputs(n, c, res, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, c, res, res, generator=g), torch.rand(n, generator=g) * 8 - 4


# ------------------------------------------------------------------------------------------ network

def test_ncsnpp_shapes_and_grads_reach_every_parameter():
    model = SongUNet(8, 1, 1, **DIGITS)
    x, t = inputs(3, 1, 8)
    y = model(x, t)
    assert y.shape == (3, 1, 8, 8)
    y.square().sum().backward()
    assert not [name for name, p in model.named_parameters() if p.grad is None]   # aux path included
    assert SongUNet(16, 3, 3, **NINE_SKIPS)(*inputs(2, 3, 16)).shape == (2, 3, 16, 16)


@pytest.fixture(scope="module")
def paper_ncsnpp():
    torch.manual_seed(0)
    return SongUNet(32, 3, 3, **NCSNPP)   # the paper's Fig. 4 NCSN++: 128 ch, [2,2,2], 2 blocks, attn 16


def test_ncsnpp_cifar10_parameter_count(paper_ncsnpp):
    # The counts of NVlabs/edm training/networks.py SongUNet with EDM train.py's --arch=ncsnpp settings
    # (128 ch, [2,2,2], attn 16, no augment_dim), computed once by instantiating that reference code outside
    # this project: 56,395,523 at EDM's 4 blocks, 35,788,035 at the paper's 2 (DDPM++: 55,732,739 and 35,125,251).
    edm = SongUNet(32, 3, 3, num_blocks=4, **NCSNPP)
    assert sum(p.numel() for p in edm.parameters()) == 56_395_523
    assert sum(p.numel() for p in paper_ncsnpp.parameters()) == 35_788_035


def test_ncsnpp_layout(paper_ncsnpp):
    model = paper_ncsnpp
    assert list(model.enc) == ["32x32_conv", "32x32_block0", "32x32_block1",
                               "16x16_down", "16x16_aux_residual", "16x16_block0", "16x16_block1",
                               "8x8_down", "8x8_aux_residual", "8x8_block0", "8x8_block1"]
    a16, a8 = model.enc["16x16_aux_residual"], model.enc["8x8_aux_residual"]
    assert isinstance(a16, DownConv) and (a16.in_channels, a16.out_channels) == (3, 256)   # from the image
    assert (a8.in_channels, a8.out_channels) == (256, 256) and a8.padding == (2, 2)
    assert model.num_skips == 9 and model.map_layer0.in_features == 256                  # channel_mult_noise 2
    assert model.map_noise.freqs.shape == (128,)                                         # Fourier features
    assert model.enc["16x16_down"].resample.pad == 1 and not model.enc["16x16_down"].resample.box
    assert model.dec["16x16_up"].resample.mode == "up" and a16.down.pad == 0      # EDM's fused resampling


def test_fir_resampling_is_the_separable_filter():
    from diffmem.networks import Resample
    x = torch.randn(1, 2, 8, 8, dtype=torch.float64)
    f = torch.tensor([1.0, 3.0, 3.0, 1.0], dtype=torch.float64) / 8
    k = f.outer(f)
    padded = torch.nn.functional.pad(x, (1, 1, 1, 1))
    by_hand = torch.stack([torch.stack([(padded[..., 2 * i:2 * i + 4, 2 * j:2 * j + 4] * k).sum((-1, -2))
                                        for j in range(4)], -1) for i in range(4)], -2)
    torch.testing.assert_close(Resample("down", (1, 3, 3, 1)).double()(x), by_hand)
    # Upsampling of a constant image is that constant away from the border (the taps of each phase sum to 1).
    up = Resample("up", (1, 3, 3, 1)).double()(torch.ones(1, 1, 4, 4, dtype=torch.float64))
    torch.testing.assert_close(up[..., 1:-1, 1:-1], torch.ones(1, 1, 6, 6, dtype=torch.float64))


def test_bad_encoder_and_filter_raise():
    with pytest.raises(ValueError, match="encoder='skip'"):
        SongUNet(8, 1, 1, **{**DIGITS, "encoder": "skip"})
    with pytest.raises(ValueError, match="even number of taps"):
        SongUNet(8, 1, 1, **{**DIGITS, "resample_filter": (1, 2, 1)})


# --------------------------------------------------------------------------- skip mask, residual encoder

def taps(model, x, t):
    """(input of every encoder block after a down block, skip half received by every decoder block, output)."""
    widths = [m.out_channels for n, m in model.enc.items() if "_aux" not in n]
    skip_width = {n: widths.pop() for n in model.dec if "_block" in n}
    entered, received, hooks = {}, {}, []
    for name, block in model.enc.items():
        hooks.append(block.register_forward_pre_hook(
            lambda m, args, name=name: entered.__setitem__(name, args[0].detach().clone())))
    for name, width in skip_width.items():
        hooks.append(model.dec[name].register_forward_pre_hook(
            lambda m, args, name=name, width=width: received.__setitem__(name, args[0][:, -width:].detach().clone())))
    try:
        with torch.no_grad():
            out = model(x, t)
    finally:
        for h in hooks:
            h.remove()
    return entered, received, out


def test_masked_skip_feeds_zeros_and_the_down_skip_is_the_residual_sum():
    torch.manual_seed(0)
    ref = scramble(SongUNet(16, 3, 3, **NINE_SKIPS))
    dec_blocks = [n for n in ref.dec if "_block" in n]          # pop order: skip 9 first, skip 1 last
    x, t = inputs(2, 3, 16)
    entered_all, received_all, out_all = taps(ref, x, t)
    # All on: a down block's skip is the sum with the input path, i.e. what the next block receives.
    torch.testing.assert_close(received_all[dec_blocks[5]], entered_all["8x8_block0"], rtol=0, atol=0)   # skip 4
    torch.testing.assert_close(received_all[dec_blocks[2]], entered_all["4x4_block0"], rtol=0, atol=0)   # skip 7
    for k in range(9):
        mask = [int(i != k) for i in range(9)]
        model = SongUNet(16, 3, 3, skip_connections=mask, **NINE_SKIPS).eval()
        model.load_state_dict(ref.state_dict())
        entered, received, out = taps(model, x, t)
        for name in entered:                                    # the encoder path, aux included, is unchanged
            torch.testing.assert_close(entered[name], entered_all[name], rtol=0, atol=0)
        for j, name in enumerate(dec_blocks):
            if 8 - j == k:
                assert received[name].shape == received_all[name].shape and not received[name].any(), (k, name)
            else:
                torch.testing.assert_close(received[name], received_all[name], rtol=0, atol=0)
        assert (out - out_all).abs().max() > 1e-4 * out_all.abs().max(), k


# ------------------------------------------------------------------------------------------ VE

class Spy(torch.nn.Module):
    """F(x; c_noise) = x * 0.3 + c_noise, recording what the preconditioning feeds it."""

    def __init__(self):
        super().__init__()
        self.calls = []

    def forward(self, x, c_noise, class_labels=None):
        self.calls.append((x.clone(), c_noise.clone()))
        return x * 0.3 + c_noise.reshape(-1, 1, 1, 1)


def test_ve_preconditioning_coefficients():
    ve = VEPrecond(Spy())
    x = torch.randn(4, 1, 8, 8)
    sigma = torch.tensor([0.02, 0.7, 13.0, 100.0])
    d = ve(x, sigma)
    x_in, c_noise = ve.net.calls[-1]
    torch.testing.assert_close(x_in, x, rtol=0, atol=0)                              # c_in = 1
    torch.testing.assert_close(c_noise, torch.log(sigma / 2))                         # c_noise = ln(sigma / 2)
    f = x * 0.3 + torch.log(sigma / 2).reshape(-1, 1, 1, 1)
    torch.testing.assert_close(d, x + sigma.reshape(-1, 1, 1, 1) * f)                 # c_skip = 1, c_out = sigma
    assert PRECONDITIONERS["ve"] is VEPrecond and (ve.sigma_min, ve.sigma_max) == (0.02, 100.0)


def test_ve_sigma_schedule_and_loss_weight():
    ve = VEPrecond(Spy())
    sigma = ve.sample_sigma(8, "cpu", torch.Generator().manual_seed(3))
    u = torch.rand(8, generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(sigma, 0.02 * torch.exp(u * math.log(100 / 0.02)))   # log-uniform on [0.02, 100]
    many = ve.sample_sigma(20000, "cpu", torch.Generator().manual_seed(4))
    assert many.min() >= 0.02 and many.max() <= 100
    assert abs(many.log().mean().item() - 0.5 * (math.log(0.02) + math.log(100))) < 0.05
    torch.testing.assert_close(ve.loss_weight(sigma), sigma ** -2)


def test_ve_denoising_loss_is_the_formula():
    torch.manual_seed(0)
    ve = VEPrecond(scramble(SongUNet(8, 1, 1, **DIGITS)))
    y = torch.rand(5, 1, 8, 8) * 2 - 1
    loss = denoising_loss(ve, y, generator=torch.Generator().manual_seed(7))
    g = torch.Generator().manual_seed(7)                       # EDM VELoss: u, then the noise
    sigma = (0.02 * 5000 ** torch.rand(5, generator=g)).reshape(-1, 1, 1, 1)
    n = torch.randn(5, 1, 8, 8, generator=g) * sigma
    with torch.no_grad():
        expect = (sigma ** -2 * (ve(y + n, sigma) - y) ** 2).flatten(1).sum(1)
    torch.testing.assert_close(loss.detach(), expect)


class RangeSpy:
    """A denoiser with a preconditioning's supported range that records the noise levels it is called at."""

    def __init__(self, precond):
        self.sigma_min, self.sigma_max, self.seen = precond.sigma_min, precond.sigma_max, []

    def __call__(self, x, sigma, class_labels=None):
        self.seen.append(float(sigma))
        return x * 0


def noise_levels_seen(precond):
    spy = RangeSpy(precond)
    edm_sampler(spy, torch.zeros(1, 1, 2, 2))
    return sorted(set(spy.seen), reverse=True)


def test_sampler_keeps_to_the_ve_range_as_edm_generate():
    # EDM generate.py: sigma_min = max(0.002, net.sigma_min) = 0.02 for VE; sigma_max = min(80, 100) = 80.
    levels = noise_levels_seen(VEPrecond(Spy()))
    rho, lo, hi = 7, 0.02, 80.0
    expect = [(hi ** (1 / rho) + i / 17 * (lo ** (1 / rho) - hi ** (1 / rho))) ** rho for i in range(18)]
    assert levels == pytest.approx(expect, rel=1e-12)
    # VP supports [0.0010, 152.2]: the default [0.002, 80] is unchanged.
    vp = noise_levels_seen(VPPrecond(Spy()))
    assert (vp[0], vp[-1]) == (pytest.approx(80.0), pytest.approx(0.002))
    # A denoiser without a range (the theoretical optimum) samples the range it is given.
    bare = []
    edm_sampler(lambda x, s, c=None: (bare.append(float(s)), x * 0)[1], torch.zeros(1, 1, 2, 2), sigma_min=0.001)
    assert min(bare) == pytest.approx(0.001)


# ------------------------------------------------------------------------------------------ config

def test_arch_sets_the_knobs_and_explicit_keys_win():
    ddpmpp = load_config().model
    assert (ddpmpp.arch, ddpmpp.embedding, ddpmpp.channel_mult_noise, ddpmpp.encoder, ddpmpp.resample_filter) == \
        ("ddpmpp", "positional", 1, "standard", [1, 1])
    ncsnpp = load_config(None, ["model.arch=ncsnpp", "model.precond=ve"]).model
    assert (ncsnpp.embedding, ncsnpp.channel_mult_noise, ncsnpp.encoder, ncsnpp.resample_filter) == \
        ("fourier", 2, "residual", [1, 3, 3, 1])
    mixed = load_config(None, ["model.arch=ncsnpp", "model.embedding=positional", "model.resample_filter=[1,1]"]).model
    assert (mixed.embedding, mixed.encoder, mixed.resample_filter) == ("positional", "residual", [1, 1])
    assert load_config(None, ["model.arch=ncsnpp", "model.encoder=null"]).model.encoder == "residual"


@pytest.mark.parametrize("override, message", [
    ("model.arch=ncsn", "model.arch='ncsn' is not one of ddpmpp, ncsnpp; did you mean 'ncsnpp'?"),
    ("model.precond=vee", "model.precond='vee' is not one of vp, ve, edm; did you mean 've'?"),
    ("model.encoder=resid", "model.encoder='resid' is not one of standard, residual; did you mean 'residual'?"),
    ("model.resample_filter=[1,3,3]", "model.resample_filter=[1, 3, 3] must be an even number of taps"),
    ("model.channel_mult_noise=0", "model.channel_mult_noise=0 must be positive"),
])
def test_bad_model_keys_fail_with_one_line(override, message):
    with pytest.raises(ConfigError) as err:
        load_config(None, [override])
    assert message in str(err.value) and "\n" not in str(err.value)


# ------------------------------------------------------------------------------------------ training

def test_cli_trains_ncsnpp_ve_on_the_digits(tmp_path):
    sets = {"model.arch": "ncsnpp", "model.precond": "ve", "data.size": 20, "train.duration": "2kimg",
            "train.batch_size": 32, "eval.every": "2kimg", "eval.num_samples": 32, "eval.batch_size": 32,
            "eval.num_steps": 6, "train.log_every": "1kimg"}
    args = [a for k, v in sets.items() for a in ("--set", f"{k}={v}")]
    # One OpenMP thread: this model is tiny, and two threads on a busy 2-core machine take minutes instead of ~15 s.
    run = subprocess.run([sys.executable, "-m", "diffmem.train", "--config", "experiments/digits.yaml", *args,
                          "--output", str(tmp_path / "run")], capture_output=True, text=True, timeout=300,
                         env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert run.returncode == 0, run.stderr
    assert "best memorization ratio" in run.stdout
    resolved = load_config(tmp_path / "run" / "config.yaml").model
    assert (resolved.arch, resolved.precond, resolved.encoder, resolved.embedding) == \
        ("ncsnpp", "ve", "residual", "fourier")
    ckpt = torch.load(tmp_path / "run" / "checkpoint" / "checkpoint.pt", weights_only=False)
    assert any("aux_residual" in k for k in ckpt["ema"]) and all(torch.isfinite(v).all() for v in ckpt["ema"].values())
