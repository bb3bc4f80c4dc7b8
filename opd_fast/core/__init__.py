"""The loss core: what every fused loss call goes through, whatever its backend.

* ``call``       - the typed, validated description of one call (``LossCall``, ``Tuning``)
* ``validation`` - the checks that build it from the public functions' arguments
* ``tokens``     - compaction of counted tokens and the reduction's per-row coefficients
* ``engine``     - the interface each backend implements and the one autograd Function
* ``dispatch``   - which backend runs a call (``"auto"``, availability and its reasons)
* ``run``        - a call on its engine: coefficients in, loss and per-token stats out
"""
