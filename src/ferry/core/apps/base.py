"""The one lifecycle every app has.

An app turns the local view into flows for the tables it owns, per owner object: a port (local
or remote), a network, or the app itself (table defaults). The core calls these functions again
whenever an owner changes and diffs the result against what is installed, so "add local port",
"remove remote port" and "port moved from chassis A to chassis B" are all the same call with a
different location. Apps do no I/O and keep no state.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field

from ferry.core.topology import Location, Topology
from ferry.model.objects import LogicalPort, LogicalSwitch
from ferry.switch.flow import Flow


@dataclass(frozen=True)
class Context:
    topology: Topology
    tunnel_ofport: int | None
    port_cookie: Callable[[App, LogicalPort], int]
    """The cookie of an app's flows for a port: flows the datapath learns carry it too."""
    patch_ofports: Mapping[str, int] = field(default_factory=dict)
    """Physical network → br-int's patch port to the bridge it is mapped to here."""


class App:
    name = ""

    def static_flows(self, ctx: Context) -> Iterable[Flow]:
        """Flows that depend on nothing but the app (defaults of its tables)."""
        return ()

    def port_flows(self, ctx: Context, port: LogicalPort, net: LogicalSwitch,
                   loc: Location) -> Iterable[Flow]:
        """Flows for one port at its location (Local, Remote or None)."""
        return ()

    def network_flows(self, ctx: Context, net: LogicalSwitch) -> Iterable[Flow]:
        """Flows for one network (flooding, tunnel ingress)."""
        return ()
