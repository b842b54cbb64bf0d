"""Router scheduling: which admitted request runs next through the pipeline, and which is refused.

Pure logic (no I/O): priority and tenant resolution (:mod:`.request`), queue orderings
(:mod:`.policies`), service-time estimates (:mod:`.estimate`) and the concurrency gate that applies
them with queue limits, queue timeouts and deadline-aware admission (:mod:`.scheduler`).
See docs/scheduling.md.
"""

from router.scheduling.context import current_priority, hop_priority
from router.scheduling.estimate import Ewma
from router.scheduling.policies import POLICY_NAMES, make_policy
from router.scheduling.request import (
    DEFAULT_TENANT,
    PRIORITY_METADATA,
    TENANT_METADATA,
    CallerInfo,
    resolve_priority,
    resolve_tenant,
)
from router.scheduling.scheduler import Scheduler, SchedulerSettings
from router.scheduling.ticket import Ticket

__all__ = [
    "CallerInfo", "DEFAULT_TENANT", "Ewma", "POLICY_NAMES", "PRIORITY_METADATA", "Scheduler", "SchedulerSettings",
    "TENANT_METADATA", "Ticket", "current_priority", "hop_priority", "make_policy", "resolve_priority", "resolve_tenant",
]
