"""A monitor's checkpoint state and its rollback snapshot (tensors and primitives only)."""

from __future__ import annotations

from typing import Any

from lightning_landscape.callbacks._probes import host_copy
from lightning_landscape.core.alerts import Alert


class MonitorState:
    """``state_dict`` / ``load_state_dict`` of a :class:`~lightning_landscape.callbacks._base.LandscapeCallback`:
    its probe set (when it owns one; a shared one is its composition's to save, once), its scheduler's state, its
    alert history, the subclass's ``_monitor_state_dict`` and a standalone monitor's rollback keeper."""

    @property
    def state_key(self) -> str:
        # Lightning reads state_key on every hook call (profiler action names), so it is computed once.
        if self._state_key is None:
            self._state_key = self._generate_state_key(**self._state_key_fields())
        return self._state_key

    def _state_key_fields(self) -> dict[str, Any]:
        """The arguments that tell two instances of this monitor apart in one checkpoint."""
        return {"prefix": self.prefix}

    def state_dict(self) -> dict[str, Any]:
        return {
            # a shared probe set is the composition's to checkpoint (once)
            **(self.probes.state_dict() if self._owns_probes else {}),
            **self.schedule.state_dict(),
            "alerts": [a.to_dict() for a in self.alerts],
            "alert_counts": dict(self.alert_counts),
            "monitor": self._monitor_state_dict(),
            **({"alerting": self.alerting.state_dict()} if self._owns_rollback_keeper() else {}),
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        # The rank is not known here; the probe slice of this rank is picked on the first batch.
        if self._owns_probes and "probe_by_rank" in state_dict:
            self.probes.load_state_dict(state_dict)
        self.schedule.load_state_dict(state_dict)
        self.alerts = [Alert.from_dict(a) for a in state_dict.get("alerts", [])]
        self._last_stored_step = {a.kind: a.step for a in self.alerts}
        self.alert_counts = {str(k): int(v) for k, v in state_dict.get("alert_counts", {}).items()}
        self._load_monitor_state_dict(state_dict.get("monitor", {}))
        if "alerting" in state_dict and self.alerting.monitors.get("") is self:
            self.alerting.load_state_dict(state_dict["alerting"])

    def _owns_rollback_keeper(self) -> bool:
        # a standalone monitor checkpoints its keeper (only with "rollback": the snapshot doubles the checkpoint)
        return self.alerting.monitors.get("") is self and self.alerting.rollback_enabled

    def _rollback_state(self) -> dict[str, Any]:
        """This monitor's state for the rollback snapshot: ``state_dict`` without the probe set (fixed), the alert
        history (kept across a rollback) and the dispatcher (which holds the snapshot), copied to the host."""
        state = self.state_dict()
        for key in ("probe_by_rank", "alerts", "alert_counts", "alerting"):
            state.pop(key, None)
        return host_copy(state)

    def _rollback_restore(self, state: dict[str, Any]) -> None:
        """Inverse of :meth:`_rollback_state`: the alert history stays as it is (the probe set is not in it)."""
        kept = (self.alerts, self.alert_counts)
        self.load_state_dict(state)
        self.alerts, self.alert_counts = kept

    def _monitor_state_dict(self) -> dict[str, Any]:
        """Subclass state (tensors and primitives only)."""
        return {}

    def _load_monitor_state_dict(self, state: dict[str, Any]) -> None:
        """Inverse of :meth:`_monitor_state_dict`."""


__all__ = ["MonitorState"]
