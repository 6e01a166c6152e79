"""The migration probe: sequence-numbered UDP from client VMs to a target VM that echoes it.

- :mod:`ferry.probe.records`: the wire format and the record files the agents write;
- :mod:`ferry.probe.agent`: the processes that run inside VM namespaces (``python -m``);
- :mod:`ferry.probe.runner`: :class:`~ferry.probe.runner.Probe`, which starts and stops them;
- :mod:`ferry.probe.report`: loss, duplicates, reordering, downtime around a pause;
- :mod:`ferry.probe.plot`: a PNG timeline.

This module imports nothing heavy: the agent starts with it at 1 kHz probe start-up.
"""
