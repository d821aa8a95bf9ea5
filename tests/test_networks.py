"""DDPM++ U-Net: shapes, skip-connection mask (paper §4), conditioning, embeddings, EDM's init and size."""
import math

import pytest
import torch

from diffmem.networks import SongUNet, PositionalEmbedding, Resample

DIGITS = dict(model_channels=32, channel_mult=(1, 2), num_blocks=1, attn_resolutions=(), dropout=0.0)
# Same topology as the basic setup (3 levels x 3 skips = 9), small enough for many forward passes.
NINE_SKIPS = dict(model_channels=16, channel_mult=(1, 2, 2), num_blocks=2, attn_resolutions=(8,), dropout=0.0)


def scramble(model, seed=0):
    """EDM's init leaves the residual branches and the output at 1e-5; make every path visibly matter."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.05)
    return model.eval()


def inputs(n, c, res, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, c, res, res, generator=g), torch.rand(n, generator=g) * 100


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """These tensors are tiny; on a shared 2-core machine two OpenMP threads per op can be 100x slower."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def basic():
    torch.manual_seed(0)
    return SongUNet(32, 3, 3)   # paper's basic setup: 128 ch, [2,2,2], 2 blocks, attn 16, dropout 0.13


# ---------------------------------------------------------------------------------------------- shapes

def test_digits_shape_and_grads_reach_every_parameter():
    model = SongUNet(8, 1, 1, **DIGITS)
    x, t = inputs(5, 1, 8)
    y = model(x, t)
    assert y.shape == (5, 1, 8, 8) and y.dtype == torch.float32
    y.square().sum().backward()
    missing = [name for name, p in model.named_parameters() if p.grad is None]
    assert not missing   # every module takes part (DDP would otherwise need find_unused_parameters)


def test_basic_setup_shape(basic):
    x, t = inputs(2, 3, 32)
    with torch.no_grad():
        y = basic.eval()(x, t)
    assert y.shape == (2, 3, 32, 32) and torch.isfinite(y).all()


def test_16x16_shape():
    model = SongUNet(16, 3, 3, model_channels=32, num_blocks=1, attn_resolutions=(8,), dropout=0.0)
    x, t = inputs(3, 3, 16)
    assert model(x, t).shape == (3, 3, 16, 16)


def test_out_channels_may_differ_from_in_channels():
    assert SongUNet(8, 3, 1, **DIGITS)(*inputs(2, 3, 8)).shape == (2, 1, 8, 8)


def test_resolution_checks():
    with pytest.raises(ValueError, match="power of two"):
        SongUNet(12, 1, 1, **DIGITS)
    with pytest.raises(ValueError, match="power of two"):
        SongUNet(4, 1, 1, model_channels=32, channel_mult=(1,), attn_resolutions=())
    with pytest.raises(ValueError, match="lowest resolution must be >= 2"):
        SongUNet(8, 1, 1, model_channels=16, channel_mult=(1, 1, 1, 1), num_blocks=1, attn_resolutions=())
    # 8 -> 4 -> 2 is the deepest allowed stack at 8x8.
    model = SongUNet(8, 1, 1, model_channels=16, channel_mult=(1, 1, 1), num_blocks=1, attn_resolutions=())
    assert model(*inputs(2, 1, 8)).shape == (2, 1, 8, 8)
    with pytest.raises(ValueError, match="embedding"):
        SongUNet(8, 1, 1, embedding="sinusoidal", **DIGITS)


# ------------------------------------------------------------------------------------ architecture pins

def test_basic_setup_parameter_count(basic):
    # 35.1M for 2 blocks; with EDM's 4 blocks the same code gives 55.73M, EDM's DDPM++ CIFAR-10 size.
    assert sum(p.numel() for p in basic.parameters()) == 35_125_251


def test_edm_four_block_parameter_count():
    model = SongUNet(32, 3, 3, num_blocks=4)
    assert round(sum(p.numel() for p in model.parameters()) / 1e6, 2) == 55.73


def test_basic_setup_layout(basic):
    assert basic.num_skips == 9 == len(basic.enc)
    assert list(basic.enc) == ["32x32_conv", "32x32_block0", "32x32_block1", "16x16_down", "16x16_block0",
                               "16x16_block1", "8x8_down", "8x8_block0", "8x8_block1"]
    assert sum("_block" in name for name in basic.dec) == 9
    # Attention as EDM: encoder blocks at 16x16, last decoder block at 16x16, and the first middle block.
    attn = [f"enc.{n}" for n, b in basic.enc.items() if getattr(b, "attention", False)]
    attn += [f"dec.{n}" for n, b in basic.dec.items() if b.attention]
    assert attn == ["enc.16x16_block0", "enc.16x16_block1", "dec.8x8_in0", "dec.16x16_block2"]
    assert basic.map_layer1.out_features == 512 and basic.map_layer0.in_features == 128
    # GroupNorm: 32 groups but >= 4 channels per group; eps 1e-6.
    assert basic.dec["32x32_block2"].norm0.num_groups == 32 and basic.dec["32x32_block2"].norm0.eps == 1e-6
    small = SongUNet(8, 1, 1, **DIGITS)
    assert small.num_skips == 4 and small.enc["8x8_block0"].norm0.num_groups == 8


def test_edm_initialisation(basic):
    def xavier_bound(w):
        fan_in, fan_out = w.shape[1] * w[0, 0].numel(), w.shape[0] * w[0, 0].numel()
        return math.sqrt(6 / (fan_in + fan_out))

    w = basic.out_conv.weight
    assert 0.5e-5 * xavier_bound(w) < w.abs().max() <= 1e-5 * xavier_bound(w)
    blk = basic.enc["16x16_block0"]
    assert blk.conv1.weight.abs().max() <= 1e-5 * xavier_bound(blk.conv1.weight)
    assert blk.proj.weight.abs().max() <= 1e-5 * xavier_bound(blk.proj.weight)
    q = blk.qkv.weight
    assert 0.9 * math.sqrt(0.2) * xavier_bound(q) < q.abs().max() <= math.sqrt(0.2) * xavier_bound(q)
    c0 = blk.conv0.weight
    assert 0.9 * xavier_bound(c0) < c0.abs().max() <= xavier_bound(c0)
    biases = [b for n, b in basic.named_parameters() if n.endswith(".bias") and "norm" not in n]
    assert biases and all(not b.any() for b in biases)


def test_resample_box_filter_is_the_fir_filter():
    x = torch.randn(2, 3, 8, 8)
    for mode in ("up", "down"):
        fast, fir = Resample(mode), Resample(mode)
        fir.box = False   # force EDM's depthwise (transposed) convolution with f f^T / sum(f)^2
        torch.testing.assert_close(fast(x), fir(x), rtol=0, atol=1e-6)
    assert Resample("down")(x).shape == (2, 3, 4, 4) and Resample("up")(x).shape == (2, 3, 16, 16)
    # A longer filter (NCSN++'s [1,3,3,1]) keeps the shapes.
    assert Resample("down", (1, 3, 3, 1))(x).shape == (2, 3, 4, 4)
    assert Resample("up", (1, 3, 3, 1))(x).shape == (2, 3, 16, 16)


# ------------------------------------------------------------------------------------------ skip mask

def run_with_taps(model, x, t, zero_skip_of=()):
    """Forward pass recording each encoder push and each skip a decoder block receives.

    zero_skip_of: decoder block names whose received skip half is overwritten with zeros (by hand)."""
    enc_widths = [b.out_channels for b in model.enc.values()]
    skip_widths = {n: enc_widths.pop() for n in model.dec if "_block" in n}   # decoder pops LIFO
    pushed, received, hooks = [], {}, []
    for block in model.enc.values():
        hooks.append(block.register_forward_hook(lambda m, a, out: pushed.append(out.detach().clone())))
    for name in skip_widths:
        def pre(m, args, name=name):
            h, emb = args
            assert h.shape[1] == m.in_channels
            received[name] = h[:, -skip_widths[name]:].detach().clone()   # cat([x, skip]): skip is last
            if name in zero_skip_of:
                h = h.clone()
                h[:, -skip_widths[name]:] = 0
                return h, emb
        hooks.append(model.dec[name].register_forward_pre_hook(pre))
    try:
        with torch.no_grad():
            out = model(x, t)
    finally:
        for h in hooks:
            h.remove()
    return out, pushed, received


def test_skip_mask_feeds_zeros_at_exactly_the_disabled_position():
    torch.manual_seed(0)
    ref = scramble(SongUNet(16, 3, 3, **NINE_SKIPS))
    assert ref.num_skips == 9
    dec_blocks = [n for n in ref.dec if "_block" in n]   # pops in reverse push order (LIFO)
    x, t = inputs(2, 3, 16)
    out_all, pushed_all, received_all = run_with_taps(ref, x, t)
    for j, name in enumerate(dec_blocks):   # all on: every decoder block gets its encoder tensor
        torch.testing.assert_close(received_all[name], pushed_all[ref.num_skips - 1 - j], rtol=0, atol=0)
        assert received_all[name].abs().max() > 0

    for k in range(ref.num_skips):
        mask = [1] * ref.num_skips
        mask[k] = 0
        model = SongUNet(16, 3, 3, skip_connections=mask, **NINE_SKIPS)
        model.load_state_dict(ref.state_dict())
        model.eval()
        out, pushed, received = run_with_taps(model, x, t)
        for a, b in zip(pushed, pushed_all):   # the encoder path itself is untouched
            torch.testing.assert_close(a, b, rtol=0, atol=0)
        for j, name in enumerate(dec_blocks):
            src = ref.num_skips - 1 - j
            if src == k:
                assert received[name].shape == pushed_all[k].shape and not received[name].any(), (k, name)
            else:
                torch.testing.assert_close(received[name], pushed_all[src], rtol=0, atol=0)
        # Disabling skip k is the same as zeroing that skip by hand in the full model ...
        target = dec_blocks[ref.num_skips - 1 - k]
        by_hand, _, _ = run_with_taps(ref, x, t, zero_skip_of={target})
        torch.testing.assert_close(out, by_hand, rtol=0, atol=0)
        # ... and it changes the output (a mask that were ignored would not).
        assert (out - out_all).abs().max() > 1e-4 * out_all.abs().max(), k


def test_paper_skip_numbering():
    # Paper skip 1 (input conv, 16x16 here) reaches the last decoder block; skip 9 the first one.
    ref = SongUNet(16, 3, 3, **NINE_SKIPS)
    x, t = inputs(1, 3, 16)
    first_off = SongUNet(16, 3, 3, skip_connections=[0] + [1] * 8, **NINE_SKIPS)
    last_off = SongUNet(16, 3, 3, skip_connections=[1] * 8 + [0], **NINE_SKIPS)
    for m in (first_off, last_off):
        m.load_state_dict(ref.state_dict())
    _, _, rec = run_with_taps(first_off.eval(), x, t)
    assert not rec["16x16_block2"].any() and rec["4x4_block0"].any()
    assert rec["16x16_block2"].shape[1] == 16   # the input conv's width (model_channels)
    _, _, rec = run_with_taps(last_off.eval(), x, t)
    assert not rec["4x4_block0"].any() and rec["16x16_block2"].any()


def test_all_skips_off_runs_and_keeps_widths():
    model = SongUNet(8, 1, 1, skip_connections=[0, 0, 0, 0], **DIGITS)
    full = SongUNet(8, 1, 1, **DIGITS)
    assert [b.in_channels for b in model.dec.values()] == [b.in_channels for b in full.dec.values()]
    assert model(*inputs(2, 1, 8)).shape == (2, 1, 8, 8)
    assert model.skip_connections == (False,) * 4 and full.skip_connections == (True,) * 4


@pytest.mark.parametrize("mask", [[1] * 4, [1] * 10, [], [1] * 8 + [2], [1] * 8 + [-1], [1] * 8 + ["1"],
                                  "111111111", [1] * 8 + [0.5]])
def test_bad_skip_masks_raise(mask):
    with pytest.raises(ValueError, match=r"expected 9 = len\(channel_mult\) \* \(num_blocks \+ 1\)|9 entries "
                                         r"= len\(channel_mult\) \* \(num_blocks \+ 1\)|list of 9 zeros"):
        SongUNet(16, 3, 3, skip_connections=mask, **NINE_SKIPS)


def test_bad_mask_length_message():
    with pytest.raises(ValueError) as err:
        SongUNet(16, 3, 3, skip_connections=[1, 1, 1, 1], **NINE_SKIPS)
    assert str(err.value) == ("model.skip_connections has 4 entries, expected 9 = len(channel_mult) * "
                              "(num_blocks + 1); use e.g. [1, 1, 1, 1, 1, 1, 1, 1, 1]")


def test_mask_accepts_bools_and_tensors():
    m = SongUNet(8, 1, 1, skip_connections=torch.tensor([1, 0, 1, 1]), **DIGITS)
    assert m.skip_connections == (True, False, True, True)
    assert SongUNet(8, 1, 1, skip_connections=(True, True, False, True), **DIGITS).skip_connections[2] is False


# ------------------------------------------------------------------------------------------ conditioning

def test_class_labels_change_the_output_and_match_edm_one_hot():
    torch.manual_seed(0)
    model = scramble(SongUNet(8, 1, 1, label_dim=10, **DIGITS))
    x, t = inputs(3, 1, 8)
    a = model(x, t, torch.tensor([0, 1, 2]))
    b = model(x, t, torch.tensor([3, 1, 9]))
    assert (a[0] - b[0]).abs().max() > 1e-3 and (a[2] - b[2]).abs().max() > 1e-3
    torch.testing.assert_close(a[1], b[1])   # same label, same output (no cross-sample leakage)
    # The lookup is EDM's map_label(one_hot * sqrt(label_dim)).
    labels = torch.tensor([4, 0, 9])
    one_hot = torch.nn.functional.one_hot(labels, 10).float() * math.sqrt(10)
    edm = model.map_noise(t) + model.map_label(one_hot)
    expect = torch.nn.functional.silu(model.map_layer1(torch.nn.functional.silu(model.map_layer0(edm))))
    torch.testing.assert_close(model.embed(t, labels), expect)


def test_many_unique_labels():
    model = SongUNet(8, 1, 1, label_dim=50_000, **DIGITS)
    assert model.map_label.weight.shape == (32, 50_000)
    x, t = inputs(3, 1, 8)
    model(x, t, torch.tensor([0, 25_000, 49_999])).sum().backward()
    grad_cols = model.map_label.weight.grad.abs().sum(0).nonzero().flatten().tolist()
    assert grad_cols == [0, 25_000, 49_999]


def test_label_errors():
    x, t = inputs(2, 1, 8)
    with pytest.raises(ValueError, match="unconditional"):
        SongUNet(8, 1, 1, **DIGITS)(x, t, torch.tensor([0, 1]))
    cond = SongUNet(8, 1, 1, label_dim=10, **DIGITS)
    with pytest.raises(ValueError, match="conditional.*pass class_labels"):
        cond(x, t)
    with pytest.raises(ValueError, match="integer class indices"):
        cond(x, t, torch.nn.functional.one_hot(torch.tensor([0, 1]), 10).float())
    with pytest.raises(ValueError, match="integer class indices"):
        cond(x, t, torch.tensor([0, 1, 2]))
    with pytest.raises(ValueError, match="noise_labels"):
        cond(x, t[:1], torch.tensor([0, 1]))


# ------------------------------------------------------------------------------------------ embeddings

def test_positional_embedding_formula():
    emb = PositionalEmbedding(8, max_positions=10000, endpoint=True)
    x = torch.tensor([0.0, 3.0, 999.0])
    freqs = torch.tensor([1.0, 1e-4 ** (1 / 3), 1e-4 ** (2 / 3), 1e-4])   # endpoint: last frequency is 1e-4
    arg = x[:, None] * freqs
    torch.testing.assert_close(emb(x), torch.cat([arg.sin(), arg.cos()], 1))


def test_fourier_and_positional_both_run():
    torch.manual_seed(0)
    pos = SongUNet(8, 1, 1, embedding="positional", **DIGITS)
    torch.manual_seed(0)
    four = SongUNet(8, 1, 1, embedding="fourier", **DIGITS)
    x, t = inputs(4, 1, 8)
    assert pos(x, t).shape == four(x, t).shape == (4, 1, 8, 8)
    freqs = four.map_noise.freqs
    assert freqs.shape == (16,) and 5 < freqs.std() < 40          # N(0, 16^2)
    assert all(p is not freqs for p in four.parameters())          # fixed, not trained
    assert "map_noise.freqs" in four.state_dict()                  # but saved with the model
    assert sum(p.numel() for p in four.parameters()) == sum(p.numel() for p in pos.parameters())
    assert not torch.allclose(pos.embed(t), four.embed(t))


def test_channel_mult_noise_widens_the_noise_embedding():
    m = SongUNet(8, 1, 1, channel_mult_noise=2, embedding="fourier", **DIGITS)
    assert m.map_layer0.in_features == 64 and m.map_noise.freqs.shape == (32,)
    assert m(*inputs(2, 1, 8)).shape == (2, 1, 8, 8)


def test_dropout_only_in_training():
    model = scramble(SongUNet(8, 1, 1, **{**DIGITS, "dropout": 0.5}))
    x, t = inputs(2, 1, 8)
    torch.testing.assert_close(model(x, t), model(x, t), rtol=0, atol=0)
    model.train()
    assert not torch.equal(model(x, t), model(x, t))
