"""The backends: each implements ``core.engine.Engine`` for the losses it runs.

* ``chunked``      - two-head chunk loop (token x vocabulary tiles) on torch GEMMs: ``ChunkedEngine``
* ``tile_math``    - its per-tile divergence math in torch (``TorchTileMath``)
* ``cpu_native``   - the same tile math in the native C++ kernel (``NativeTileMath``, ctypes)
* ``rows``         - single-head chunk loop of whole vocabulary rows: ``RowsEngine``
* ``row_math``     - its per-row math in torch: log-probs, top-k categories
* ``cpu_rows``     - the same per-row math in the native kernel
* ``gathered``     - renormalized top-k from the k id logits only (sparse products): ``GatheredEngine``
* ``triton_backend`` / ``triton_rows`` - the Triton kernels (``triton/``) as engines

Which one runs a call is decided in ``core.dispatch``.
"""
