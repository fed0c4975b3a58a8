"""Budgets changed at run time: merging them with the config, and following changes.

Where budgets come from. The config's ``budgets:`` list is read at start-up. On top of
it, the store keeps one JSON document per budget name, written by ``metergate budgets
set|delete|revert`` or the admin API (:mod:`proxy.admin`), and shared by every replica
on that store. :func:`merge_specs` combines the two by name:

- a stored document that is a budget entry (the shape of a config ``budgets:`` entry)
  *overrides* the config entry of the same name as a whole, or adds a new budget;
- a stored *tombstone*, the document ``{"deleted": true}``, hides the config budget of
  that name (a config budget cannot be removed from a file the replicas have already
  read; the tombstone removes it from every replica until it is reverted);
- no stored document: the config entry applies as written.

Overrides are stored whole (``budgets set`` merges the given fields into the budget in
force and writes the result, see :func:`apply_changes`), so later edits of the config
file do not silently mix with a run-time change; ``budgets revert NAME`` drops the
stored document and the config entry applies again.

A stored document that does not validate (written around Metergate, or by another
version) never stops serving: it is logged and skipped, and the config entry of that
name, if any, stays in force.

Following changes. :class:`SpecWatcher` polls the store's spec version (one cheap read
every ``interval_s``), and when it moved reloads the documents and swaps the gate's
specs (:meth:`proxy.budget_gate.BudgetGate.replace_specs`). Requests in flight keep
their reservations. A store error keeps the last good specs.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Final, Literal

from proxy.background import BackgroundTask, OutageLog, poll_forever, poll_once
from proxy.budget import BudgetConfigError, BudgetSpec, parse_budget
from proxy.budget_gate import BudgetGate
from proxy.report import nanos_to_usd_str
from proxy.store.base import Store

__all__ = [
    "CHANGEABLE_FIELDS",
    "DEFAULT_POLL_INTERVAL_S",
    "TOMBSTONE",
    "MergedBudgets",
    "Source",
    "SpecWatcher",
    "apply_changes",
    "is_tombstone",
    "merge_budgets",
    "merge_specs",
    "spec_to_doc",
]

log = logging.getLogger("metergate.budget")

DEFAULT_POLL_INTERVAL_S: Final = 0.5
TOMBSTONE: Final[Mapping[str, Any]] = {"deleted": True}
CHANGEABLE_FIELDS: Final = (
    "scope",
    "limit_usd",
    "period",
    "timezone",
    "enforce",
    "requests_per_minute",
    "tokens_per_minute",
)
"""The fields ``budgets set`` and ``PUT /admin/budgets/NAME`` may change (not the name)."""

Source = Literal["config", "run-time", "override"]
"""Where a budget in force comes from: the config as written, the store only, or a
config budget whose stored document overrides it."""


def is_tombstone(doc: Mapping[str, Any]) -> bool:
    """True for ``{"deleted": true}`` (a ``name`` member is tolerated)."""
    return doc.get("deleted") is True and set(doc) <= {"deleted", "name"}


def spec_to_doc(spec: BudgetSpec) -> dict[str, Any]:
    """The config entry that parses back to ``spec`` (amounts as exact USD text)."""
    doc: dict[str, Any] = {
        "name": spec.name,
        "scope": dict(spec.scope),
        "period": spec.period,
        "timezone": str(spec.timezone),
        "enforce": spec.enforce,
    }
    if spec.limit_nanos is not None:
        doc["limit_usd"] = nanos_to_usd_str(spec.limit_nanos)
    if spec.requests_per_minute is not None:
        doc["requests_per_minute"] = spec.requests_per_minute
    if spec.tokens_per_minute is not None:
        doc["tokens_per_minute"] = spec.tokens_per_minute
    return doc


def _parse_stored(name: str, doc: Mapping[str, Any]) -> BudgetSpec:
    """A stored override as a spec; its ``name`` must be the name it is stored under."""
    if doc.get("name", name) != name:
        raise BudgetConfigError(
            f"budgets.{name}: the stored document names the budget {doc.get('name')!r}."
        )
    return parse_budget({**doc, "name": name}, f"budgets.{name}")


@dataclass(frozen=True, slots=True)
class MergedBudgets:
    """The budgets in force and where each comes from (see the module docstring).

    ``specs``: config budgets in config order, then run-time-only ones by name.
    ``hidden``: config budgets hidden by a tombstone. ``invalid``: stored documents
    that were skipped, by name, with the reason.
    """

    specs: tuple[BudgetSpec, ...]
    sources: Mapping[str, Source]
    hidden: tuple[str, ...]
    invalid: Mapping[str, str]

    def get(self, name: str) -> BudgetSpec | None:
        """The budget in force with this name, or None."""
        return next((spec for spec in self.specs if spec.name == name), None)


def merge_budgets(
    config_specs: Sequence[BudgetSpec], store_docs: Mapping[str, Mapping[str, Any]]
) -> MergedBudgets:
    """Combine config budgets and stored documents (rules in the module docstring)."""
    overrides: dict[str, BudgetSpec] = {}
    tombstones: set[str] = set()
    invalid: dict[str, str] = {}
    for name in sorted(store_docs):
        doc = store_docs[name]
        if is_tombstone(doc):
            tombstones.add(name)
            continue
        try:
            overrides[name] = _parse_stored(name, doc)
        except BudgetConfigError as exc:
            invalid[name] = str(exc)
            log.error("ignoring the run-time budget %r, which is not valid: %s", name, exc)
    specs: list[BudgetSpec] = []
    sources: dict[str, Source] = {}
    hidden: list[str] = []
    config_names = {spec.name for spec in config_specs}
    for spec in config_specs:
        if spec.name in tombstones:
            hidden.append(spec.name)
        elif spec.name in overrides:
            specs.append(overrides[spec.name])
            sources[spec.name] = "override"
        else:
            specs.append(spec)
            sources[spec.name] = "config"
    for name, spec in overrides.items():
        if name not in config_names:
            specs.append(spec)
            sources[name] = "run-time"
    return MergedBudgets(tuple(specs), sources, tuple(hidden), invalid)


def merge_specs(
    config_specs: Sequence[BudgetSpec], store_docs: Mapping[str, Mapping[str, Any]]
) -> tuple[BudgetSpec, ...]:
    """The budgets in force: config budgets overridden, added to or hidden by the
    stored documents. Invalid documents are logged and skipped."""
    return merge_budgets(config_specs, store_docs).specs


def apply_changes(
    name: str, current: BudgetSpec | None, changes: Mapping[str, Any]
) -> tuple[dict[str, Any], BudgetSpec]:
    """The document to store when ``budgets set NAME`` changes the budget in force
    (``current``, or None for a new budget) by ``changes``; and its parsed spec.

    Only the given fields change; a field given as None is removed (``limit_usd:
    None`` turns a capped budget into a rate-limit-only one). Raises
    :class:`BudgetConfigError` with a message naming the field.
    """
    unknown = sorted(set(changes) - set(CHANGEABLE_FIELDS))
    if unknown:
        raise BudgetConfigError(
            f"budgets.{name}: cannot change {', '.join(map(repr, unknown))}; the fields are "
            f"{', '.join(CHANGEABLE_FIELDS)}."
        )
    doc = spec_to_doc(current) if current is not None else {"name": name}
    for field_name, value in changes.items():
        if value is None:
            doc.pop(field_name, None)
        else:
            doc[field_name] = value
    if "scope" not in doc:
        raise BudgetConfigError(
            f"budgets.{name}.scope: the new budget {name!r} needs a scope, such as "
            "team=search, or all to match every request."
        )
    spec = parse_budget(doc, f"budgets.{name}")
    return spec_to_doc(spec), spec


class SpecWatcher:
    """Keeps a :class:`BudgetGate`'s specs in step with the store's run-time budgets.

    ``await start()`` loads once (a store that is down leaves the gate as it is) and
    then polls in a background task; ``await stop()`` ends it. A change written by any
    replica or by the CLI reaches this one within ``interval_s`` plus one store read.
    """

    def __init__(
        self,
        store: Store,
        gate: BudgetGate,
        config_specs: Sequence[BudgetSpec],
        interval_s: float = DEFAULT_POLL_INTERVAL_S,
        *,
        timeout_s: float = 2.0,
    ) -> None:
        if not interval_s > 0:
            raise ValueError(f"The spec poll interval must be positive, not {interval_s}.")
        self.store = store
        self.gate = gate
        self.config_specs = tuple(config_specs)
        self.interval_s = interval_s
        self.timeout_s = timeout_s
        self.version: int | None = None  # of the specs the gate has; None: never loaded
        self.reloads = 0  # for tests and metrics
        self._outage = OutageLog(log, "run-time budgets")
        self._task = BackgroundTask("spec watcher")

    async def refresh(self) -> bool:
        """Poll once: reload and swap the gate's specs when the version moved. Returns
        True when it swapped. Store errors propagate (:meth:`run` tolerates them)."""
        # The version is read BEFORE the documents: a change landing in between is
        # then seen again at the next poll, never missed.
        # asyncio.timeout, not wait_for: on Python 3.11 wait_for can swallow a
        # cancellation that arrives with the reply, and stop() would then never return.
        async with asyncio.timeout(self.timeout_s):
            version = await self.store.budget_specs_version()
        if version == self.version:
            return False
        async with asyncio.timeout(self.timeout_s):
            docs = await self.store.budget_specs()
        self.gate.replace_specs(merge_specs(self.config_specs, docs))
        self.version = version
        self.reloads += 1
        log.info("budgets reloaded from the store (spec version %d)", version)
        return True

    async def _poll(self) -> None:
        await poll_once(self.refresh, self._outage)

    async def run(self) -> None:
        """Poll until cancelled, keeping the last good specs through store errors."""
        await poll_forever(self.refresh, self._outage, self.interval_s)

    async def start(self) -> None:
        """Load once now (so the first request sees run-time budgets), then poll in a
        background task."""
        if self._task.running:
            raise RuntimeError("The spec watcher is already running.")
        await self._poll()
        self._task.start(self.run())

    async def stop(self) -> None:
        """Stop polling; call before closing the store."""
        await self._task.stop()
