"""The northbound model (``objects``) and typed, invariant-checked store access (``northbound``)."""
