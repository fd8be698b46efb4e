"""`ddptrain describe DATA`: the plan `fit` would make of a table (the same functions decide), before any training."""

from __future__ import annotations

import json
from typing import Any

from ddptrain.config import BAG_BELOW_ROWS, CV_FOLDS, FitConfig
from ddptrain.console import console
from ddptrain.data import cross_validates, load_table, table_plan
from ddptrain.preprocess import ColumnRole, code_columns, code_notes, id_candidates, id_notes, level_notes


def table_description(cfg: FitConfig) -> dict[str, Any]:
    table = load_table(cfg.data, cfg.seed, cfg.n_samples, cfg.n_features, cfg.n_classes, cfg.noise)
    target, task, classes, rows, notes, roles = table_plan(cfg, table)
    codes = code_columns(table, roles, rows)
    # over every row with a target: fit counts its training rows (and bags a table this short: no validation rows)
    decided = id_candidates(roles, codes) if cross_validates(cfg, len(rows), False, BAG_BELOW_ROWS) else ()
    notes += level_notes(table, roles, rows, cfg.embedding_dim) + code_notes(codes) + id_notes(roles, codes, decided)
    tried = decided if cfg.numbers_as_categories is None else ()  # given, the flag decides: fit runs no folds
    noted = {r.name for r in roles if r.like_ids and r.name not in decided} | set(tried)
    if tried:
        names = ", ".join(f"'{name}'" for name in tried)
        notes.append(f"whole numbers like ids in {names}: on a table this short "
                     f"fit tries each as categories by {CV_FOLDS}-fold cross-validation and keeps what the folds "
                     "prefer (--numbers-as-categories COLUMNS decides instead)")
    return {
        "data": table.path, "rows": len(table), "target": target, "task": task, "classes": list(classes),
        "rows_with_target": int(len(rows)),
        "columns": [{"name": r.name, "type": r.kind, "role": r.role,
                     "why": _why(r, codes, noted),
                     "missing": round(r.missing, 4), "distinct": r.distinct,
                     **({"codes": codes[r.name]} if r.name in codes else {}),
                     **({"like_ids": True} if r.like_ids and r.name not in codes else {})} for r in roles],
        "notes": notes,
    }


def _why(role: ColumnRole, codes: dict[str, int], noted: set[str]) -> str:
    """Why the column has its role, with what the notes add about it."""
    if role.name in codes:
        return f"{role.reason}; {codes[role.name]:,} values repeat like codes: each also embedded"
    if role.like_ids:
        return f"{role.reason}; like ids" + (" (see the note)" if role.name in noted else "")
    return role.reason


def describe_table(cfg: FitConfig, as_json: bool) -> dict[str, Any]:
    plan = table_description(cfg)
    if as_json:
        console.line(json.dumps(plan), force=True)
        return plan
    from rich.table import Table

    columns = Table(title=f"ddptrain describe: {plan['data']} ({plan['rows']:,} rows)", title_justify="left")
    for heading in ("column", "type", "role", "why", "missing", "distinct"):
        columns.add_column(heading)
    for c in plan["columns"]:
        role = c["role"] + (" + codes" if "codes" in c else "")
        columns.add_row(c["name"] or "(unnamed)", c["type"], role, c["why"], f"{c['missing']:.1%}",
                        f"{c['distinct']:,}")
    console.print(columns, force=True)
    what = (f"classification, {len(plan['classes'])} classes: {', '.join(plan['classes'][:20])}"
            + (", ..." if len(plan["classes"]) > 20 else "") if plan["task"] == "classification" else "regression")
    console.line(f"target '{plan['target']}': {what}", force=True)
    for note in plan["notes"]:
        console.line(f"note: {note}", force=True)
    return plan
