"""Ferry: a distributed SDN controller for Open vSwitch, built for VM live migration."""

__version__ = "0.1.0"
