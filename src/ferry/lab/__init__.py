"""The lab: real chassis (OVS in network namespaces), an underlay, and VMs, on one machine."""
