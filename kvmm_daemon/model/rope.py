"""Rotary position embedding in llama.cpp's convention.

GGUF Llama files store Q and K rows permuted (convert_hf_to_gguf's `permute`), so that
RoPE rotates adjacent pairs (x[2i], x[2i+1]) by angle pos * theta^(-2i/rope_dim). The
safetensors loader applies the same permutation, so this one convention serves both.
Left out: rope scaling variants (linear/YaRN/llama3); files that ask for them are refused
by the loader.
"""
from __future__ import annotations

import torch


class RotaryEmbedding:
    """cos/sin tables for positions [0, max_positions), computed once.

    Attributes:
        cis: complex64 [max_positions, rope_dim // 2]; row p holds e^(i * angle) for position
            p, so a rotation is one complex multiply of the pairs viewed as complex numbers.
    """

    def __init__(self, rope_dim: int, max_positions: int, theta: float) -> None:
        assert rope_dim % 2 == 0, rope_dim
        inv_freq = 1.0 / (theta ** (torch.arange(0, rope_dim, 2, dtype=torch.float64) / rope_dim))
        angles = torch.outer(torch.arange(max_positions, dtype=torch.float64), inv_freq)
        self.rope_dim = rope_dim
        self.cis = torch.polar(torch.ones_like(angles), angles).to(torch.complex64)

    def angles(self, positions: torch.Tensor) -> torch.Tensor:
        """e^(i * angle) [T, 1, rope_dim/2] for `positions` [T]: computed once per step and
        shared by every layer."""
        return self.cis[positions].unsqueeze(1)

    def apply(self, x: torch.Tensor, angles: torch.Tensor) -> torch.Tensor:
        """Rotate x [T, heads, head_dim] (float32) by precomputed `angles`; a new tensor."""
        t, heads, dim = x.shape
        pairs = x[..., : self.rope_dim].reshape(t, heads, self.rope_dim // 2, 2)
        out = torch.view_as_real(torch.view_as_complex(pairs) * angles).reshape(t, heads, self.rope_dim)
        if self.rope_dim == dim:
            return out
        return torch.cat((out, x[..., self.rope_dim:]), dim=-1)

    def __call__(self, x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """Rotate x [T, heads, head_dim] at `positions` [T]; returns a new tensor."""
        return self.apply(x, self.angles(positions))
