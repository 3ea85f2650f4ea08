"""Bounds for calls that must be cut off, not speed goals.

A call guarded by a 50-100 ms timeout must come back long before `CUT_OFF_S`; one that hangs never comes back.
The bound is loose on purpose: CI machines are shared and a busy one can stall a process for a few hundred
milliseconds (a 0.2 s bound failed there). How fast these paths are is measured in bench/, not asserted here.
"""

CUT_OFF_S = 2.0
