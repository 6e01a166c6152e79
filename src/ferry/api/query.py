"""Neutron's list query language over rendered resources.

- Filters: ``?attr=value`` (repeat for "any of"); booleans as true/false; ``fixed_ips=
  ip_address=X`` / ``subnet_id=Y`` for ports. An attribute the resource lacks is a 400.
- ``fields=a&fields=b``: only those attributes (on lists and shows).
- Sorting: ``sort_key=k&sort_dir=asc|desc`` (repeatable, paired in order); id breaks ties.
- Pagination: ``limit`` and ``marker`` (an id); ``page_reverse=true`` pages backwards. A full
  page carries a ``<collection>_links`` ``next`` link, as openstacksdk follows.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any
from urllib.parse import urlencode

from fastapi import Request

from ferry.api.errors import bad_request

Item = dict[str, Any]
SpecialFilter = Callable[[Item, list[str]], bool]

RESERVED = {"fields", "limit", "marker", "page_reverse", "sort_key", "sort_dir"}
# Attributes Neutron accepts as filters but Ferry does not model: they match nothing unusual.
IGNORED = {"tags", "tags-any", "not-tags", "not-tags-any"}


def _matches(value: Any, wanted: list[str]) -> bool:
    if isinstance(value, bool):
        return any(w.lower() == str(value).lower() for w in wanted)
    if value is None:
        return any(w in ("", "None", "null") for w in wanted)
    if isinstance(value, list | tuple):
        return any(str(v) in wanted for v in value)
    if isinstance(value, dict):
        return False
    return str(value) in wanted


def filters_of(request: Request) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for key, value in request.query_params.multi_items():
        if key not in RESERVED and key not in IGNORED:
            out.setdefault(key, []).append(value)
    return out


def fields_of(request: Request) -> list[str]:
    return [f for f in request.query_params.getlist("fields") if f]


def project(item: Item, fields: list[str]) -> Item:
    return {k: v for k, v in item.items() if k in fields} if fields else item


def apply(
    request: Request,
    items: list[Item],
    collection: str,
    special: Mapping[str, SpecialFilter] | None = None,
) -> dict[str, Any]:
    """Filter, sort, paginate and project ``items``; the list response body."""
    special = special or {}
    filters = filters_of(request)
    known = set(items[0]) if items else set()
    for key, wanted in filters.items():
        if key in special:
            items = [i for i in items if special[key](i, wanted)]
        elif items and key not in known:
            raise bad_request(f"[{key}] is invalid attribute for filtering")
        else:
            items = [i for i in items if _matches(i.get(key), wanted)]
    items = _sorted(request, items)
    page, links = _paginate(request, items, collection)
    fields = fields_of(request)
    body: dict[str, Any] = {collection: [project(i, fields) for i in page]}
    if links:
        body[f"{collection}_links"] = links
    return body


def _key(value: Any) -> tuple[int, Any]:
    if value is None:
        return (0, "")
    if isinstance(value, bool | int | float):
        return (1, value)
    return (2, str(value))


def _sort_key(key: str) -> Callable[[Item], tuple[int, Any]]:
    return lambda i: _key(i.get(key))


def _sorted(request: Request, items: list[Item]) -> list[Item]:
    keys = request.query_params.getlist("sort_key")
    dirs = request.query_params.getlist("sort_dir")
    if len(dirs) > len(keys):
        raise bad_request("more sort_dir than sort_key values")
    for d in dirs:
        if d not in ("asc", "desc"):
            raise bad_request(f"sort_dir {d!r} must be asc or desc")
    out = sorted(items, key=lambda i: str(i.get("id", "")))
    pairs = list(zip(keys, dirs + ["asc"] * (len(keys) - len(dirs)), strict=True))
    for key, direction in reversed(pairs):  # stable sorts, least significant key first
        if items and key not in items[0]:
            raise bad_request(f"{key} is an invalid attribute for sort_key")
        out.sort(key=_sort_key(key), reverse=direction == "desc")
    return out


def _paginate(
    request: Request, items: list[Item], collection: str
) -> tuple[list[Item], list[dict[str, str]]]:
    params = request.query_params
    limit_s, marker = params.get("limit"), params.get("marker")
    reverse = params.get("page_reverse", "false").lower() == "true"
    limit = 0
    if limit_s is not None:
        if not limit_s.isdigit():
            raise bad_request(f"limit {limit_s!r} must be a non-negative integer")
        limit = int(limit_s)
    seq = list(reversed(items)) if reverse else items
    if marker is not None:
        ids = [str(i.get("id")) for i in seq]
        if marker not in ids:
            raise bad_request(f"marker {marker} is not a listed object")
        seq = seq[ids.index(marker) + 1:]
    page = seq[:limit] if limit else seq
    links: list[dict[str, str]] = []
    if limit and len(page) == limit and len(seq) > limit:
        links.append({"rel": "next", "href": _link(request, str(page[-1]["id"]), reverse)})
    if marker is not None and page:
        links.append({"rel": "previous", "href": _link(request, str(page[0]["id"]),
                                                        not reverse)})
    if reverse:
        page.reverse()
    return page, links


def _link(request: Request, marker: str, reverse: bool) -> str:
    query = [(k, v) for k, v in request.query_params.multi_items()
             if k not in ("marker", "page_reverse")]
    query.append(("marker", marker))
    if reverse:
        query.append(("page_reverse", "True"))
    return str(request.url.replace(query=urlencode(query)))
