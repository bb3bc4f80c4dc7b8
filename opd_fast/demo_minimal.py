"""Placeholder for the demo until the runner lands: distill one LM head into another.

A student head learns a fixed teacher head's next-token distributions through the fused loss,
on hidden states it is given. It is the smallest honest end-to-end use of the package.
"""

from __future__ import annotations

import torch

from . import fused_linear_kl


def run_minimal_demo(steps: int = 200, vocab: int = 512, hidden: int = 64, seed: int = 0) -> int:
    gen = torch.Generator().manual_seed(seed)
    teacher_w = torch.randn(vocab, hidden, generator=gen) / hidden**0.5 * 4
    student_w = torch.nn.Parameter(torch.randn(vocab, hidden, generator=gen) / hidden**0.5)
    opt = torch.optim.Adam([student_w], lr=3e-2)
    for step in range(steps + 1):
        h = torch.randn(256, hidden, generator=gen)
        loss = fused_linear_kl(h, student_w, h, teacher_w, divergence="forward_kl")
        if step % 50 == 0:
            print(f"step {step:4d}  forward KL {loss.item():.4f}")
        opt.zero_grad()
        loss.backward()
        opt.step()
    return 0
