"""Decentralized algorithms, one short module each, registered by `gossip.algorithm` name.

The protocol is `Algorithm` (base.py); a user's algorithm subclasses it and registers the same way:

    from gossiplab.algorithms import Algorithm
    from gossiplab.registry import ALGORITHMS

    @ALGORITHMS.register("my-method")
    class MyMethod(Algorithm): ...
"""

from gossiplab.algorithms import adpsgd, choco, dimat, ditto, dsgd, l2c, local, sgp
from gossiplab.algorithms.base import Algorithm, Sent, restore, saved

__all__ = ["Algorithm", "Sent", "adpsgd", "choco", "dimat", "ditto", "dsgd", "l2c", "local", "restore", "saved", "sgp"]
