"""The check record, the run's context (CPU mode, deadline, results) and the table."""

from __future__ import annotations

import os
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

CPU = os.environ.get("TRITON_INTERPRET") == "1"  # gpu_check.py sets it for --cpu before any import


@dataclass
class Check:
    """One row of the table. ok: True (right), False (wrong), None (skipped, informational or a
    ratio row, whose target, if any, is in `target_met`)."""

    part: str
    case: str
    ok: bool | None
    seconds: float
    detail: str = ""
    target_met: bool | None = None


def err(e: BaseException) -> str:
    first = str(e).splitlines()[0] if str(e) else ""
    return f"{type(e).__name__}: {first}"


def timed(fn: Callable, *a: Any, **kw: Any) -> tuple[Any, float]:
    t = time.perf_counter()
    out = fn(*a, **kw)
    return out, time.perf_counter() - t


@dataclass
class Ctx:
    """What every part gets: the mode, the arguments, a scratch dir, the deadline and the results."""

    cpu: bool
    args: Any
    tmp: Path
    deadline: float  # time.perf_counter() value by which the run must end
    checks: list[Check] = field(default_factory=list)
    skipped_for_time: list[str] = field(default_factory=list)
    cuda_why: str | None = None  # why CUDA checks are skipped (None: CUDA is here)
    emit: Callable[[Check], None] = lambda c: None

    def left(self) -> float:
        return self.deadline - time.perf_counter()

    def add(self, c: Check) -> Check:
        c.ok = None if c.ok is None else bool(c.ok)  # numpy bools do not go into JSON
        c.target_met = None if c.target_met is None else bool(c.target_met)
        self.checks.append(c)
        self.emit(c)
        return c

    def info(self, part: str, case: str, detail: str, seconds: float = 0.0) -> None:
        self.add(Check(part, case, None, seconds, detail))

    def run(
        self,
        part: str,
        case: str,
        fn: Callable[[], tuple[bool | None, str]],
        *,
        est: tuple[float, float],
        needs_cuda: bool = False,
        needs: str | None = None,
    ) -> Check:
        """Runs one check `fn` -> (ok, detail) unless it needs CUDA here (skipped, with why), or
        something else missing (`needs`: why not), or the time left is below its estimate `est`
        (GPU seconds, CPU seconds): skipped for time, listed at the end. A crash is a wrong result."""
        if needs_cuda and self.cuda_why:
            return self.add(Check(part, case, None, 0.0, f"skipped: needs CUDA ({self.cuda_why})"))
        if needs:
            return self.add(Check(part, case, None, 0.0, f"skipped: {needs}"))
        need = est[1] if self.cpu else est[0]
        if self.left() < need:
            self.skipped_for_time.append(f"{part}: {case}")
            why = f"skipped for time: needs ~{need:.0f} s, {max(0.0, self.left()):.0f} s left"
            return self.add(Check(part, case, None, 0.0, why))
        t = time.perf_counter()
        try:
            ok, detail = fn()
        except Exception as e:  # a crash is a wrong result too
            traceback.print_exc()
            ok, detail = False, err(e)
        return self.add(Check(part, case, ok, time.perf_counter() - t, detail))

    def ratio(
        self, part: str, case: str, value: float, anchor: str, target: float | None, seconds: float
    ) -> None:
        """A ratio row: `value` (this path's rate over the anchor's, measured in this run)."""
        met = None if target is None else value >= target
        goal = "" if target is None else f"; target {100 * target:.0f}%: {'met' if met else 'BELOW'}"
        self.add(Check(part, case, None, seconds, f"{100 * value:.0f}% of {anchor}{goal}", met))


def table(checks: list[Check]) -> str:
    head = f"{'part':<7} {'case':<62} {'result':<6} {'seconds':>8}  detail"
    lines = [head, "-" * 118]
    for c in checks:
        res = {True: "ok", False: "WRONG", None: "-"}[c.ok]
        if c.target_met is False:
            res = "BELOW"
        lines.append(f"{c.part:<7} {c.case[:62]:<62} {res:<6} {c.seconds:>8.2f}  {c.detail}")
    return "\n".join(lines)
