"""Ferry's Neutron-compatible northbound API (``ferry api``)."""
