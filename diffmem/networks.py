"""The U-Net of Song et al. 2021 ("Score-Based Generative Modeling through SDEs") as configured in EDM.

Follows NVlabs/edm `training/networks.py` SongUNet in its two configurations (paper.md §6, §8; EDM train.py
--arch, diffmem.config.ARCHITECTURES):
- DDPM++: standard encoder, positional noise embedding, channel_mult_noise 1, [1,1] resampling;
- NCSN++: residual encoder (a downsampled copy of the input path joins every level), random Fourier
  embedding of scale 16, channel_mult_noise 2, [1,3,3,1] resampling.
Both: standard decoder, additive embedding in each block, GroupNorm eps 1e-6, skip_scale sqrt(0.5), one
attention head, xavier_uniform init with the last conv of every residual branch at weight scale 1e-5.

The one addition of Gu et al. (paper.md §4): `skip_connections`, a 0/1 mask over the encoder->decoder
skips in encoder push order (the paper's skips 1..9). A disabled skip is replaced by zeros of the same
shape, so the decoder's widths do not change.
"""
from __future__ import annotations

import math
import torch
import torch.nn.functional as F
from torch.nn.functional import silu


def _init(module, scale=1.0):
    """EDM's init: xavier_uniform weights (fan = channels * kernel area) times `scale`, zero bias."""
    torch.nn.init.xavier_uniform_(module.weight)
    with torch.no_grad():
        module.weight.mul_(scale)
    if module.bias is not None:
        torch.nn.init.zeros_(module.bias)
    return module


def conv(cin, cout, kernel, scale=1.0):
    return _init(torch.nn.Conv2d(cin, cout, kernel, padding=kernel // 2), scale)


def linear(cin, cout, scale=1.0, bias=True):
    return _init(torch.nn.Linear(cin, cout, bias=bias), scale)


def group_norm(channels, eps=1e-6):
    # EDM: 32 groups, but at least 4 channels per group.
    return torch.nn.GroupNorm(min(32, channels // 4), channels, eps=eps)


class Resample(torch.nn.Module):
    """2x up- or downsampling with a separable FIR filter f (EDM Conv2d up/down, kernel-free part).

    down: depthwise conv with f f^T / sum(f)^2, stride 2.  up: transposed conv with 4 f f^T / sum(f)^2.
    For f = [1,1] these are exactly 2x2 average pooling and nearest-neighbour upsampling, used directly.
    padding: EDM's (len(f) - 1) // 2 unless given (0 after DownConv's wider-padded conv)."""

    def __init__(self, mode: str, resample_filter=(1, 1), padding=None):
        super().__init__()
        assert mode in ("up", "down")
        self.mode = mode
        f = torch.as_tensor(resample_filter, dtype=torch.float32)
        self.pad = (len(f) - 1) // 2 if padding is None else padding
        self.box = tuple(resample_filter) == (1, 1) and self.pad == 0
        self.register_buffer("filter", (f.outer(f) / f.sum().square())[None, None], persistent=False)

    def forward(self, x):
        if self.box:
            if self.mode == "down":
                return F.avg_pool2d(x, 2)
            return F.interpolate(x, scale_factor=2, mode="nearest")
        c = x.shape[1]
        f = self.filter.to(x.dtype).tile([c, 1, 1, 1])
        if self.mode == "down":
            return F.conv2d(x, f, groups=c, stride=2, padding=self.pad)
        return F.conv_transpose2d(x, f * 4, groups=c, stride=2, padding=self.pad)


class DownConv(torch.nn.Conv2d):
    """3x3 conv, then FIR downsampling by 2 (EDM Conv2d with down=True, fused_resample=True): the input path
    of NCSN++'s residual encoder. The conv pads by 1 + (len(f) - 1) // 2, so the filter needs none; the bias,
    added before the filter instead of after, passes it unchanged (the taps sum to one)."""

    def __init__(self, cin, cout, resample_filter):
        super().__init__(cin, cout, 3, padding=1 + (len(resample_filter) - 1) // 2)
        _init(self)
        self.down = Resample("down", resample_filter, padding=0)

    def forward(self, x):
        return self.down(super().forward(x))


class UNetBlock(torch.nn.Module):
    """Pre-activation residual block with additive embedding and optional self-attention (DDPM++, NCSN++).

    h = conv1(dropout(silu(norm1(conv0(silu(norm0(x))) + affine(emb)))));  x' = (h + skip(x)) sqrt(1/2)
    attention:  x'' = (proj(softmax(q^T k / sqrt(C)) v) + x') sqrt(1/2)."""

    def __init__(self, cin, cout, emb_channels, up=False, down=False, attention=False, dropout=0.0,
                 resample_filter=(1, 1)):
        super().__init__()
        self.in_channels, self.out_channels, self.dropout = cin, cout, dropout
        self.skip_scale = math.sqrt(0.5)
        self.resample = Resample("up" if up else "down", resample_filter) if (up or down) else None
        self.norm0 = group_norm(cin)
        self.conv0 = conv(cin, cout, 3)
        self.affine = linear(emb_channels, cout)       # DDPM++: additive, adaptive_scale=False
        self.norm1 = group_norm(cout)
        self.conv1 = conv(cout, cout, 3, scale=1e-5)   # residual branch starts near zero
        # EDM's resample_proj=True: any resampling or width change goes through a 1x1 conv.
        self.skip = conv(cin, cout, 1) if (cin != cout or up or down) else None
        self.attention = attention
        if attention:
            self.norm2 = group_norm(cout)
            self.qkv = conv(cout, cout * 3, 1, scale=math.sqrt(0.2))
            self.proj = conv(cout, cout, 1, scale=1e-5)

    def forward(self, x, emb):
        orig = x
        h = silu(self.norm0(x))
        if self.resample is not None:   # EDM resamples before the 3x3 conv, in both branches
            h, orig = self.resample(h), self.resample(orig)
        h = self.conv0(h)
        h = silu(self.norm1(h + self.affine(emb)[:, :, None, None]))
        h = self.conv1(F.dropout(h, p=self.dropout, training=self.training))
        x = (h + (self.skip(orig) if self.skip is not None else orig)) * self.skip_scale
        if self.attention:
            n, c, hh, ww = x.shape
            # One head; EDM's channel layout of qkv: (C, 3) interleaved.
            q, k, v = self.qkv(self.norm2(x)).reshape(n, c, 3, hh * ww).unbind(2)
            a = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
            x = (self.proj(a.transpose(1, 2).reshape(n, c, hh, ww)) + x) * self.skip_scale
        return x


class PositionalEmbedding(torch.nn.Module):
    """DDPM++ sinusoidal embedding [sin(x w_i), cos(x w_i)], w_i = max_positions^(-i/(C/2-1)) (endpoint)."""

    def __init__(self, num_channels, max_positions=10000, endpoint=True):
        super().__init__()
        self.num_channels, self.max_positions, self.endpoint = num_channels, max_positions, endpoint

    def forward(self, x):
        half = self.num_channels // 2
        freqs = torch.arange(half, dtype=torch.float32, device=x.device) / (half - int(self.endpoint))
        x = x.outer((1 / self.max_positions) ** freqs)
        return torch.cat([x.sin(), x.cos()], dim=1)   # EDM's order after its sin/cos swap


class FourierEmbedding(torch.nn.Module):
    """NCSN++ random Fourier features: [sin(2 pi x w), cos(2 pi x w)], w ~ N(0, scale^2); a fixed buffer."""

    def __init__(self, num_channels, scale=16):
        super().__init__()
        self.register_buffer("freqs", torch.randn(num_channels // 2) * scale)

    def forward(self, x):
        x = x.outer(2 * math.pi * self.freqs.to(x.dtype))
        return torch.cat([x.sin(), x.cos()], dim=1)


class SongUNet(torch.nn.Module):
    """DDPM++ / NCSN++ U-Net F(x; c_noise, label) with an encoder->decoder skip mask (Gu et al. §4).

    Encoder, per level: level 0 an input 3x3 conv, later levels a downsampling block; then `num_blocks`
    blocks. Each of these pushes one skip, so there are len(channel_mult) * (num_blocks + 1) skips; the
    mask indexes them in this push order. encoder="residual" (NCSN++) adds at every level > 0, right after
    the downsampling block, x = aux = (x + DownConv(aux)) / sqrt(2) with aux = the input image at level 0;
    that sum replaces the downsampling block's skip unless the mask removed it (the paper's code: a removed
    skip stays zeros, the encoder path takes the sum either way). Decoder, per level from the lowest
    resolution: two middle blocks (first with attention, as EDM) or an upsampling block, then
    num_blocks + 1 blocks that each pop one skip and concatenate it. Output: GroupNorm, SiLU, 3x3 conv
    (the "standard" decoder of both).
    """

    def __init__(self, img_resolution: int, in_channels: int, out_channels: int, label_dim: int = 0,
                 model_channels: int = 128, channel_mult=(2, 2, 2), channel_mult_emb: int = 4,
                 num_blocks: int = 2, attn_resolutions=(16,), dropout: float = 0.13,
                 embedding: str = "positional", channel_mult_noise: int = 1, skip_connections=None,
                 resample_filter=(1, 1), encoder: str = "standard", fourier_scale: float = 16):
        super().__init__()
        levels = len(channel_mult)
        if levels < 1:
            raise ValueError("channel_mult must have at least one level")
        if img_resolution < 8 or img_resolution & (img_resolution - 1):
            raise ValueError(f"img_resolution={img_resolution} must be a power of two >= 8")
        if img_resolution >> (levels - 1) < 2:
            low = img_resolution / 2 ** (levels - 1)
            raise ValueError(f"img_resolution={img_resolution} with {levels} levels (len(channel_mult)) "
                             f"reaches {low:g}x{low:g}; "
                             f"the lowest resolution must be >= 2, use at most "
                             f"{int(math.log2(img_resolution))} levels")
        if embedding not in ("positional", "fourier"):
            raise ValueError(f"embedding={embedding!r} must be 'positional' or 'fourier'")
        if encoder not in ("standard", "residual"):
            raise ValueError(f"encoder={encoder!r} must be 'standard' (DDPM++) or 'residual' (NCSN++)")
        if len(resample_filter) < 2 or len(resample_filter) % 2 or sum(resample_filter) <= 0:
            raise ValueError(f"resample_filter={list(resample_filter)} must have an even number of taps with a "
                             f"positive sum, e.g. [1, 1] (DDPM++) or [1, 3, 3, 1] (NCSN++)")
        if label_dim < 0:
            raise ValueError(f"label_dim={label_dim} must be >= 0")
        noise_channels = model_channels * channel_mult_noise
        emb_channels = model_channels * channel_mult_emb
        if noise_channels < 4 or noise_channels % 2:
            raise ValueError(f"model_channels * channel_mult_noise = {noise_channels} must be even and >= 4")

        self.img_resolution, self.in_channels, self.out_channels = img_resolution, in_channels, out_channels
        self.label_dim = label_dim
        self.num_skips = levels * (num_blocks + 1)
        self.skip_connections = self._check_mask(skip_connections, self.num_skips)

        # Mapping: noise (and label) embedding -> two-layer MLP (EDM map_noise, map_label, map_layer0/1).
        self.map_noise = (PositionalEmbedding(noise_channels, max_positions=10000, endpoint=True)
                          if embedding == "positional" else FourierEmbedding(noise_channels, scale=fourier_scale))
        # EDM's map_label is Linear(label_dim, noise) on one-hot * sqrt(label_dim); a lookup of the
        # weight columns is the same product without building the one-hot (50k unique labels, paper §4).
        self.map_label = linear(label_dim, noise_channels) if label_dim else None
        self.map_layer0 = linear(noise_channels, emb_channels)
        self.map_layer1 = linear(emb_channels, emb_channels)

        block = dict(emb_channels=emb_channels, dropout=dropout, resample_filter=resample_filter)
        # Encoder: every entry but "_aux_residual" pushes one skip, in this order.
        self.enc = torch.nn.ModuleDict()
        cout = caux = in_channels
        for level, mult in enumerate(channel_mult):
            res = img_resolution >> level
            if level == 0:
                self.enc[f"{res}x{res}_conv"] = conv(cout, model_channels, 3)
                cout = model_channels
            else:
                self.enc[f"{res}x{res}_down"] = UNetBlock(cout, cout, down=True, **block)
                if encoder == "residual":
                    self.enc[f"{res}x{res}_aux_residual"] = DownConv(caux, cout, resample_filter)
                    caux = cout
            for idx in range(num_blocks):
                cin, cout = cout, model_channels * mult
                attn = res in attn_resolutions
                self.enc[f"{res}x{res}_block{idx}"] = UNetBlock(cin, cout, attention=attn, **block)
        skips = [m.out_channels for name, m in self.enc.items() if "_aux" not in name]

        # Decoder: "_block" entries pop a skip; "_in0/_in1/_up" do not.
        self.dec = torch.nn.ModuleDict()
        for level, mult in reversed(list(enumerate(channel_mult))):
            res = img_resolution >> level
            if level == levels - 1:
                self.dec[f"{res}x{res}_in0"] = UNetBlock(cout, cout, attention=True, **block)
                self.dec[f"{res}x{res}_in1"] = UNetBlock(cout, cout, **block)
            else:
                self.dec[f"{res}x{res}_up"] = UNetBlock(cout, cout, up=True, **block)
            for idx in range(num_blocks + 1):
                cin, cout = cout + skips.pop(), model_channels * mult
                attn = idx == num_blocks and res in attn_resolutions
                self.dec[f"{res}x{res}_block{idx}"] = UNetBlock(cin, cout, attention=attn, **block)
        self.out_norm = group_norm(cout)
        self.out_conv = conv(cout, out_channels, 3, scale=1e-5)

    @staticmethod
    def _check_mask(mask, expected):
        if mask is None:
            return (True,) * expected
        example = [1] * expected
        if isinstance(mask, (str, bytes)) or not hasattr(mask, "__len__"):
            raise ValueError(f"model.skip_connections={mask!r} must be a list of {expected} zeros and ones "
                             f"(len(channel_mult) * (num_blocks + 1)); use e.g. {example}")
        mask = list(mask)
        if len(mask) != expected:
            raise ValueError(f"model.skip_connections has {len(mask)} entries, expected {expected} "
                             f"= len(channel_mult) * (num_blocks + 1); use e.g. {example}")
        if any(isinstance(s, (str, bytes)) or s not in (0, 1) for s in mask):
            raise ValueError(f"model.skip_connections={mask} must hold only 0 or 1 ({expected} entries "
                             f"= len(channel_mult) * (num_blocks + 1)); use e.g. {example}")
        return tuple(bool(s) for s in mask)

    def embed(self, noise_labels, class_labels=None):
        """Vector fed to every block: silu(W1 silu(W0 (pos(c_noise) + W_lab onehot sqrt(L) + b_lab)))."""
        emb = self.map_noise(noise_labels)
        if self.map_label is not None:
            w = self.map_label.weight   # (noise_channels, label_dim)
            emb = emb + F.embedding(class_labels, w.t()) * math.sqrt(self.label_dim) + self.map_label.bias
        return silu(self.map_layer1(silu(self.map_layer0(emb))))

    def forward(self, x, noise_labels, class_labels=None):
        n = x.shape[0]
        if noise_labels.shape != (n,):
            raise ValueError(f"noise_labels has shape {tuple(noise_labels.shape)}, expected ({n},)")
        if self.label_dim and class_labels is None:
            raise ValueError(f"this model is conditional (label_dim={self.label_dim}): pass class_labels, "
                             f"a LongTensor of shape ({n},)")
        if not self.label_dim and class_labels is not None:
            raise ValueError("this model is unconditional (label_dim=0) but class_labels were given; "
                             "build it with label_dim > 0 or pass class_labels=None")
        if class_labels is not None and (class_labels.shape != (n,) or class_labels.is_floating_point()):
            raise ValueError(f"class_labels must be integer class indices of shape ({n},), got "
                             f"{class_labels.dtype} {tuple(class_labels.shape)}")
        emb = self.embed(noise_labels.to(x.dtype), class_labels)

        skips, aux = [], x
        for name, block in self.enc.items():
            if name.endswith("_aux_residual"):   # NCSN++: the input path joins; it is the down block's skip too
                x = aux = (x + block(aux)) / math.sqrt(2)
                if self.skip_connections[len(skips) - 1]:
                    skips[-1] = x
                continue
            x = block(x) if name.endswith("_conv") else block(x, emb)
            # Gu et al. §4: a disabled skip feeds zeros of the same shape; the encoder path is unchanged.
            skips.append(x if self.skip_connections[len(skips)] else torch.zeros_like(x))

        for name, block in self.dec.items():
            if "_block" in name:
                x = torch.cat([x, skips.pop()], dim=1)
            x = block(x, emb)
        return self.out_conv(silu(self.out_norm(x)))
