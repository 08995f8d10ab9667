"""A fixed-weight, (near) lossless pixel-space "VAE" that is a genuine ``AutoencoderKL``.

The toy base model diffuses in pixel space (32x32x3), but the project's trainer and exporter
load ``vae/`` with ``AutoencoderKL.from_pretrained``. So the "VAE" is an AutoencoderKL with
one block (``vae_scale_factor`` 1, no down/up-sampling), ``latent_channels`` 3 and weights
*set*, not trained, so that

    encode(x).latent_dist.mean  = (x - mean_c) / std_c     (per RGB channel, standardised)
    encode(x).latent_dist.std   ~ 3e-7                       (logvar clamped at -30)
    decode(z)                   = z * std_c + mean_c

up to ~1e-4 (measured by :func:`roundtrip_error`). Why not a learned VAE or 2x2
space-to-depth: a tiny AutoencoderKL trained for 3-4 minutes here reached only ~22 dB PSNR
(it would eat the training budget and blur the shapes), and an exact space-to-depth cannot be
inverted by the decoder's nearest-upsample + convolution (both are blind to pixel parity).

How the weights make a normalised, SiLU-activated network an identity:

- every ResNet block's last convolution is zero, so each block is the identity (residual);
- ``conv_in`` writes ``[x, A, -A, -x]`` into 8 channels (``A`` from the bias). The single
  GroupNorm group then has mean exactly 0 and std ``sqrt(A^2/4 + |x|^2/4) ~ A/2``, so
  ``gamma = A/2`` gives back ``x`` (relative error ``|x|^2 / A^2``);
- ``beta = B`` shifts ``x`` to where SiLU is the identity (``silu(x + B) ~ x + B``), and the
  following convolution subtracts ``B`` again.

torch / diffusers are imported inside the functions.
"""

from __future__ import annotations

A = 64.0  # constant channels that dominate the GroupNorm statistics (A^2 stays < fp16 max)
B = 12.0  # shift into SiLU's linear range: error ~ B * exp(-B) ~ 7e-5
WIDTH = 8  # channels: x (3), A, -A, -x (3)
LOGVAR = -30.0  # the posterior's log variance (DiagonalGaussianDistribution clamps here)

VAE_CONFIG = dict(
    in_channels=3,
    out_channels=3,
    down_block_types=("DownEncoderBlock2D",),
    up_block_types=("UpDecoderBlock2D",),
    block_out_channels=(WIDTH,),
    layers_per_block=1,
    latent_channels=3,
    norm_num_groups=1,
    sample_size=32,
    scaling_factor=1.0,
    mid_block_add_attention=False,
)


def build_pixel_vae(mean: tuple[float, ...], std: tuple[float, ...]):
    """The fixed pixel-space AutoencoderKL; ``mean``/``std``: per-channel stats in [-1, 1]."""
    import torch
    from diffusers import AutoencoderKL

    vae = AutoencoderKL(**VAE_CONFIG)
    mean_t = torch.tensor(mean, dtype=torch.float32)
    std_t = torch.tensor(std, dtype=torch.float32)
    with torch.no_grad():
        for p in vae.parameters():
            p.zero_()
        for m in vae.modules():  # every GroupNorm not set below: harmless unit gamma
            if isinstance(m, torch.nn.GroupNorm):
                m.weight.fill_(1.0)
        enc, dec = vae.encoder, vae.decoder
        # encoder: x -> [x, A, -A, -x]
        w = enc.conv_in.weight  # (8, 3, 3, 3)
        for c in range(3):
            w[c, c, 1, 1] = 1.0
            w[5 + c, c, 1, 1] = -1.0
        enc.conv_in.bias[3], enc.conv_in.bias[4] = A, -A
        _identity_norm(enc.conv_norm_out)
        w = enc.conv_out.weight  # (6, 8, 3, 3): mean (3) then logvar (3)
        for c in range(3):
            w[c, c, 1, 1] = 1.0 / std_t[c]
            enc.conv_out.bias[c] = -(B + mean_t[c]) / std_t[c]
            enc.conv_out.bias[3 + c] = LOGVAR
        _eye_1x1(vae.quant_conv)
        _eye_1x1(vae.post_quant_conv)
        # decoder: z -> [x, A, -A, -x] with x = z * std + mean
        w = dec.conv_in.weight  # (8, 3, 3, 3)
        for c in range(3):
            w[c, c, 1, 1] = std_t[c]
            w[5 + c, c, 1, 1] = -std_t[c]
            dec.conv_in.bias[c] = mean_t[c]
            dec.conv_in.bias[5 + c] = -mean_t[c]
        dec.conv_in.bias[3], dec.conv_in.bias[4] = A, -A
        _identity_norm(dec.conv_norm_out)
        w = dec.conv_out.weight  # (3, 8, 3, 3)
        for c in range(3):
            w[c, c, 1, 1] = 1.0
            dec.conv_out.bias[c] = -B
    vae.eval()
    return vae


def _identity_norm(norm) -> None:
    """GroupNorm over [x, A, -A, -x] -> x + B on the first three channels, 0 elsewhere."""
    norm.weight.zero_()
    norm.bias.zero_()
    norm.weight[:3] = A / 2.0
    norm.bias[:3] = B


def _eye_1x1(conv) -> None:
    n = conv.weight.shape[0]
    conv.weight.zero_()
    conv.bias.zero_()
    for c in range(n):
        conv.weight[c, c, 0, 0] = 1.0


def roundtrip_error(vae, images) -> float:
    """Max |decode(encode(x).mode()) - x| on ``images`` ((N, 3, H, W) in [-1, 1])."""
    import torch

    with torch.no_grad():
        z = vae.encode(images).latent_dist.mode()
        rec = vae.decode(z).sample
    return float((rec - images).abs().max())
