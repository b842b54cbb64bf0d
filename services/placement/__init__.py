"""Capacity-proportional placement: which contiguous layer range each worker should hold.

Pure planning (:mod:`.planner`, :mod:`.coverage`) is separate from measurement (:mod:`.measure`), so the
``plan`` command, ``up`` with ``layers: auto`` and a worker's self-placement share one cost model.
"""
