"""``Tuning``: the chunking and memory knobs every fused backend reads."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Tuning:
    """Chunking knobs of the fused backends. ``None`` means "choose from the shapes".

    ``grad_filter_eps``: skip the gradient GEMMs of every ``filter_block``-wide vocab block in
    which all |dL/dlogit| of the chunk are below ``eps`` (an absolute threshold on the gradient
    of the *reduced* loss, so it already includes the reduction's 1/num_items; Cut
    Cross-Entropy's gradient filtering). The error it introduces is at most
    ``eps * sum_v |W_v|`` per row of grad-hidden and ``eps * sum_i |h_i|`` per row of
    grad-weight, summed over skipped blocks; it is off by default because no fixed eps keeps
    that bound under every dtype's tolerance for every input.
    """

    chunk_tokens: int | None = None
    chunk_vocab: int | None = None
    memory_budget_mb: float = 256.0
    grad_filter_eps: float | None = None
    filter_block: int = 512

    def __post_init__(self) -> None:
        for name in ("chunk_tokens", "chunk_vocab"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or value < 1):
                raise ValueError(f"Tuning.{name} must be a positive int or None, got {value!r}")
        if self.memory_budget_mb <= 0:
            raise ValueError(f"Tuning.memory_budget_mb must be > 0, got {self.memory_budget_mb!r}")
        if self.grad_filter_eps is not None and self.grad_filter_eps < 0:
            raise ValueError(f"Tuning.grad_filter_eps must be >= 0 or None, got {self.grad_filter_eps!r}")
