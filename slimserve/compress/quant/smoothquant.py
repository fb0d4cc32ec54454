"""SmoothQuant (Xiao et al., 2022): move the activation outliers of a balance group into its weights,
s_j = max|x_j|^alpha / max|w_j|^(1-alpha), so that per-token INT8 activations lose less."""

from __future__ import annotations

import torch


class AbsMax:
    """Running max |x| per input channel."""

    def __init__(self) -> None:
        self.value: torch.Tensor | None = None

    def add(self, x: torch.Tensor) -> None:
        m = x.reshape(-1, x.shape[-1]).abs().amax(0).float()
        self.value = m if self.value is None else torch.maximum(self.value, m)


def smooth_scales(act_absmax: torch.Tensor, weights: list[torch.Tensor], alpha: float) -> torch.Tensor:
    w_absmax = torch.stack([w.abs().amax(0).float() for w in weights]).amax(0)
    s = act_absmax.clamp(min=1e-5).pow(alpha) / w_absmax.clamp(min=1e-5).pow(1 - alpha)
    return s.clamp(min=1e-5)
