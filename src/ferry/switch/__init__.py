"""Switch layer: flow value types (``flow``) and the OpenFlow 1.3 connection (``openflow``).

``ferry.switch.flow`` is pure; import ``ferry.switch.openflow`` explicitly for the I/O part so
that users of the value types do not load os-ken.
"""

from ferry.switch.flow import (
    DROP,
    Action,
    Controller,
    Ct,
    DecTtl,
    Flow,
    FlowError,
    GotoTable,
    Learn,
    LearnLoad,
    LearnLoadValue,
    LearnMatch,
    LearnMatchValue,
    LearnOutput,
    Match,
    Move,
    Nat,
    Output,
    RegMove,
    Resubmit,
    SetField,
)

__all__ = [
    "DROP",
    "Action",
    "Controller",
    "Ct",
    "DecTtl",
    "Flow",
    "FlowError",
    "GotoTable",
    "Learn",
    "LearnLoad",
    "LearnLoadValue",
    "LearnMatch",
    "LearnMatchValue",
    "LearnOutput",
    "Match",
    "Move",
    "Nat",
    "Output",
    "RegMove",
    "Resubmit",
    "SetField",
]
