"""Apps: each owns some pipeline tables and turns the local view into flows for them.

The order of ``ALL_APPS`` is part of every flow's cookie (the app's index): append new apps at
the end, never reorder.
"""

from __future__ import annotations

from ferry.core.apps.base import App
from ferry.core.apps.fip import FloatingIps
from ferry.core.apps.l2 import L2_APP, ArpResponder, Classifier, PortSecurity
from ferry.core.apps.l3 import Router
from ferry.core.apps.security import SecurityGroups

ALL_APPS: tuple[App, ...] = (Classifier(), PortSecurity(), ArpResponder(), L2_APP,
                             SecurityGroups(), Router(), FloatingIps())
