"""Multi-process use of the fused losses.

* Vocabulary parallelism: ``fused_linear_kl(..., process_group=group)`` (and the top-k and log-prob
  losses) with each rank holding a contiguous row shard of the heads (``vocab_parallel``), the calls
  agreed on, or rejected, on every rank at once (``layout``);
* DTensor heads (FSDP2, tensor parallel) are gathered once per call (``dtensor``).
"""

from __future__ import annotations

from .vocab_parallel import shard_rows

__all__ = ["shard_rows"]
