"""`tune`'s view of its trials: a live Rich table on a terminal, a line per trial elsewhere, and the final summary."""

from __future__ import annotations

import time
from typing import Any

from ddptrain.console import console


class TrialsView:
    """A live Rich table of this agent's trials on a terminal (trial, state, value, epoch, seconds, settings);
    elsewhere one line per trial as it ends."""

    def __init__(self, cfg: Any) -> None:  # tune.TuneConfig
        self.cfg = cfg
        self.rows: dict[int, dict[str, Any]] = {}
        self.live = None
        if console.is_terminal and not console.quiet:
            from rich.live import Live

            self.live = Live(self.table(), console=console.out, auto_refresh=False, redirect_stdout=False,
                             redirect_stderr=False)
            self.live.start()
        console.line(f"ddptrain tune: study '{cfg.study}' in {cfg.storage}, {cfg.trials} trials, {cfg.direction} "
                     f"{cfg.metric}; trial folders in {cfg.out / 'trials'}")

    def table(self) -> Any:
        from rich.table import Table

        table = Table(title=f"study {self.cfg.study}: {self.cfg.metric}", title_justify="left")
        for column in ("trial", "state", self.cfg.metric, "epoch", "seconds", "settings"):
            table.add_column(column, overflow="fold")
        for number, row in sorted(self.rows.items()):
            value = row.get("value")
            table.add_row(str(number), row["state"], "-" if value is None else f"{value:.4f}",
                          str(row.get("epoch", "-")), f"{row.get('seconds', time.monotonic() - row['began']):.1f}",
                          row["params"])
        return table

    def refresh(self) -> None:
        if self.live is not None:
            self.live.update(self.table(), refresh=True)

    def started(self, number: int, params: dict[str, Any]) -> None:
        text = " ".join(f"{k}={format_value(v)}" for k, v in params.items())
        self.rows[number] = {"state": "running", "params": text, "began": time.monotonic()}
        self.refresh()

    def progress(self, number: int, epoch: int, value: float) -> None:
        self.rows[number].update(epoch=epoch, value=value)
        self.refresh()

    def finished(self, number: int, state: str, value: float | None, seconds: float, error: str | None = None) -> None:
        row = self.rows[number]
        row.update(state=state, seconds=seconds)
        if value is not None:
            row["value"] = value
        self.refresh()
        if self.live is None:
            shown = "" if row.get("value") is None else f" {self.cfg.metric} {row['value']:.4f}"
            why = f": {error}" if error else ""
            console.line(f"trial {number}: {state}{shown} ({seconds:.1f} s) {row['params']}{why}")

    def note(self, text: str) -> None:
        console.line(f"ddptrain tune: {text}")

    def close(self) -> None:
        if self.live is not None:
            self.live.stop()
            self.live = None

    def summary(self, summary: dict[str, Any]) -> None:
        rows = [("trials", f"{summary['complete']} complete, {summary['pruned']} pruned, {summary['failed']} failed"
                           f" ({summary['counted']} of {self.cfg.trials})")]
        if summary["best"] is not None:
            best = summary["best"]
            rows += [(f"best {self.cfg.metric}", f"{best['value']:.4f} (trial {best['number']}, epoch "
                                                 f"{best['epoch']})"),
                     ("best settings", " ".join(f"{k}={format_value(v)}" for k, v in best["params"].items())),
                     ("best run folder", best["run_folder"]),
                     ("best config", f"{summary['best_toml']}: ddptrain fit --config {summary['best_toml']}")]
        console.table("ddptrain tune: done", rows, force=True)


def format_value(value: Any) -> str:
    return f"{value:.3g}" if isinstance(value, float) else str(value)
