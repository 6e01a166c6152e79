"""Security groups: stateful (conntrack) filtering of what leaves and reaches a local VM.

Owns sg_egress/sg_egress_ct (after port security) and sg_ingress/sg_ingress_ct (before
delivery). Until the rules are implemented, both directions pass straight on.
"""

from __future__ import annotations

from collections.abc import Iterable

from ferry.core.apps.base import App, Context
from ferry.core.pipeline import table
from ferry.switch.flow import Flow, GotoTable, Match


class SecurityGroups(App):
    name = "security"

    def static_flows(self, ctx: Context) -> Iterable[Flow]:
        yield Flow(table("sg_egress"), 0, Match(), (GotoTable(table("arp_responder")),))
        yield Flow(table("sg_ingress"), 0, Match(), (GotoTable(table("egress")),))
