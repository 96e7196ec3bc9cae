"""What the orchestrator does with each error class (the single place that decides).

=================  ===========================================================
error class        action
=================  ===========================================================
TransientError     retry as is, up to ``retry.max_attempts`` (worker lost too)
InjectedFailure    like TransientError (it is one)
OutOfMemory        retry, up to ``retry.max_attempts`` (memory classes: sites)
AlgorithmError     do not retry; downstream quanta are blocked
UnexpectedError    an exception we did not classify: do not retry; blocked
InvalidQuantum     do not retry; stop the stage (its unsubmitted quanta are blocked)
InsufficientInputs a gather quantum below its stage's minimum (producers failed):
                   not retried; the quantum is blocked (restart re-runs it)
CorruptInput       an input does not match its registered checksum (or is missing):
                   not retried; downstream blocked (restore it, then restart)
StorageFull        no space left / read-only file system: not retried; downstream
                   blocked (free space, then restart)
NoWorkFound        not a failure: the quantum succeeds with no outputs
=================  ===========================================================
"""

from __future__ import annotations

import enum

from ..config.campaign import RetryPolicy


class Action(enum.Enum):
    SUCCEED = "succeed"
    RETRY = "retry"
    FAIL = "fail"
    STOP_STAGE = "stop_stage"
    BLOCK = "block"


RETRYABLE = {"TransientError", "InjectedFailure", "WorkerLost"}


def decide(outcome: str, error_class: str | None, attempt: int, policy: RetryPolicy) -> Action:
    if outcome in ("succeeded", "nowork"):
        return Action.SUCCEED
    if error_class == "InvalidQuantum":
        return Action.STOP_STAGE
    if error_class == "InsufficientInputs":
        return Action.BLOCK
    if attempt >= policy.max_attempts:
        return Action.FAIL
    if error_class in RETRYABLE and policy.retry_transient:
        return Action.RETRY
    if error_class == "OutOfMemory" and policy.retry_out_of_memory:
        return Action.RETRY
    return Action.FAIL
