"""Float32 precision of the two ways to get GPTQ's upper Cholesky factor of H^-1, against float64:
the old one (cholesky -> cholesky_inverse -> cholesky) and the current one (one factorisation of
the reversed H, commit 0d2cadf), on synthetic Hessians with outlier channels.

    python bench/gptq_cholesky_precision.py   # -> stdout (bench/results/gptq-cholesky-precision.txt)
"""

from __future__ import annotations

import torch


def old(hd: torch.Tensor) -> torch.Tensor:
    lo = torch.linalg.cholesky(hd)
    return torch.linalg.cholesky(torch.cholesky_inverse(lo), upper=True)


def new(hd: torch.Tensor) -> torch.Tensor:
    eye = torch.eye(hd.shape[0], dtype=hd.dtype)
    lo = torch.linalg.cholesky(hd.flip(0, 1))
    return torch.linalg.solve_triangular(lo, eye, upper=False).flip(0, 1)


def main() -> None:
    torch.manual_seed(0)
    for n in (576, 1536):
        for trial in range(3):
            x = torch.randn(4096, n) * torch.logspace(-1, 2, n)[torch.randperm(n)]
            x[:, :4] *= 30  # a few outlier channels, as in real activations
            h = (x.T @ x / 4096).double()
            hd = h + 0.01 * h.diag().mean() * torch.eye(n, dtype=h.dtype)  # GPTQ's 1% damping
            ref = new(hd)
            e_old = ((old(hd.float()).double() - ref).norm() / ref.norm()).item()
            e_new = ((new(hd.float()).double() - ref).norm() / ref.norm()).item()
            print(n, trial, f"cond {torch.linalg.cond(hd).item():.1e} old f32 err {e_old:.2e} new f32 err {e_new:.2e}")


if __name__ == "__main__":
    main()
