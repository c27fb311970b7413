"""A site's failed reply as the server sees it: the failure's text, and whether it stops the run.

Flower hands the ServerApp's strategy each round's failures as an ``Exception`` (an error reply) or a
``(proxy, res)`` pair; :func:`stop_on_repeating_failure` raises :class:`~pipeline.federated.protocol.SiteDataError`
for one that will repeat (:func:`~pipeline.federated.protocol.is_repeating_failure`: invalid data, a missing
file), so the run stops naming the site instead of going on without it. Imports no Flower.
"""

from __future__ import annotations

from pipeline.federated.protocol import SiteDataError, is_repeating_failure


def failure_reason(failure) -> str:
    """The text of a workflow failure: an ``Exception(Error)`` for an error reply, or ``(proxy, res)``."""
    if isinstance(failure, BaseException):
        arg = failure.args[0] if failure.args else failure
        return str(getattr(arg, "reason", arg))
    return str(failure[1].status.message)


def stop_on_repeating_failure(rnd: int, failures: list) -> None:
    """Raise :class:`SiteDataError` (site and error text) when a site failed for a reason that will repeat."""
    for f in failures:
        reason = failure_reason(f)
        if is_repeating_failure(reason):
            raise SiteDataError(f"round {rnd}: {reason}; fix the site's data and rerun (--resume continues)")
