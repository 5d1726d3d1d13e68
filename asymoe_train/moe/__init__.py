"""Mixture-of-experts block: routers, expert pools, token dispatch, auxiliary losses.

Single-device code: no torch.distributed here. Expert parallelism arrives as an injected dispatcher.
"""

from asymoe_train.moe.block import MoEBlock, MoEOutput
from asymoe_train.moe.dispatch import LocalDispatcher

__all__ = ["LocalDispatcher", "MoEBlock", "MoEOutput"]
