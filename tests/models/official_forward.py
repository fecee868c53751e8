"""An independent transcription of the official hustvl/Vim forward pass, on the official state-dict layout.

Written from the published semantics (shared/ANCHORS.md), per direction with explicit sequence flips and the
float64 sequential scan oracle, so that it shares no code with vim/: the parity tests compare the two.
"""
import torch
import torch.nn.functional as F

from tests.kernels.oracle import selective_scan_oracle


def _rms_norm(x, weight, eps=1e-5):
    x = x.double()
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * weight.double()


def _branch(x, z, sd, p, sfx, d_state):
    """One Mamba direction on (batch, d_inner, L): causal conv, silu, x_proj, dt_proj, scan gated by silu(z)."""
    L = x.shape[-1]
    w = sd[f'{p}conv1d{sfx}.weight'].double()
    conv = F.conv1d(x, w, sd[f'{p}conv1d{sfx}.bias'].double(), padding=w.shape[-1] - 1, groups=x.shape[1])
    xc = F.silu(conv[..., :L])
    x_dbl = xc.transpose(1, 2) @ sd[f'{p}x_proj{sfx}.weight'].double().T
    dt_proj = sd[f'{p}dt_proj{sfx}.weight'].double()
    dt, B, C = x_dbl.split([dt_proj.shape[1], d_state, d_state], dim=-1)
    delta = (dt @ dt_proj.T).transpose(1, 2)
    A_log = sd[f'{p}A_log'] if sfx == '' else sd[f'{p}A_b_log']
    D = sd[f'{p}D'] if sfx == '' else sd[f'{p}D_b']
    return selective_scan_oracle(xc, delta, -torch.exp(A_log.double()), B.transpose(1, 2), C.transpose(1, 2),
                                 D=D, z=z, delta_bias=sd[f'{p}dt_proj{sfx}.bias'], delta_softplus=True)


def official_forward(sd, images, *, depth, stride=16, d_state=16):
    """logits of the official model for ``images`` (batch, 3, H, W), computed in float64."""
    x = F.conv2d(images.double(), sd['patch_embed.proj.weight'].double(), sd['patch_embed.proj.bias'].double(),
                 stride=stride).flatten(2).transpose(1, 2)
    batch, M, _ = x.shape
    cls = sd['cls_token'].double().expand(batch, -1, -1)
    hidden = torch.cat([x[:, :M // 2], cls, x[:, M // 2:]], dim=1) + sd['pos_embed'].double()
    residual = None
    for i in range(depth):
        p = f'layers.{i}.mixer.'
        residual = hidden if residual is None else residual + hidden
        h = _rms_norm(residual, sd[f'layers.{i}.norm.weight'])
        xz = (h @ sd[f'{p}in_proj.weight'].double().T).transpose(1, 2)
        xin, z = xz.chunk(2, dim=1)
        out_f = _branch(xin, z, sd, p, '', d_state)
        out_b = _branch(xin.flip(-1), z.flip(-1), sd, p, '_b', d_state)
        hidden = ((out_f + out_b.flip(-1)) / 2).transpose(1, 2) @ sd[f'{p}out_proj.weight'].double().T
    h = _rms_norm(residual + hidden, sd['norm_f.weight'])
    return h[:, M // 2] @ sd['head.weight'].double().T + sd['head.bias'].double()
