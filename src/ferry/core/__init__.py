"""The pure controller core: the local view, the apps and the flow diff. No I/O here."""
