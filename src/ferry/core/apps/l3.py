"""Distributed routing: router interfaces answered on every chassis, routing on the sending
chassis. Owns l3_route and l3_nexthop. Not implemented yet: the tables stay empty, so a
packet to a router's MAC is dropped."""

from __future__ import annotations

from ferry.core.apps.base import App


class Router(App):
    name = "l3"
