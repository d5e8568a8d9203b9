"""`kvmm trace --check`: one line saying which probes attach on this kernel and why the others cannot.

It does what a trace does up to the first read, for real: checks privileges, bcc, kernel
headers and tracefs (probes.detect_environment), each probe's tracepoints, then compiles and
attaches every probe that has them (BpfSession.open, which drops a probe whose C does not
compile) and detaches. So "attach" means attached on this kernel just now, not "should".

Prior art: bcc's tools probing `BPF.tracepoint_exists` before choosing a tracepoint
(biolatency.py); `bpftool feature probe`. Left out: probing kprobes (never used here).
"""
from __future__ import annotations

from kvmm_daemon.trace.probes import BpfSession, Environment, detect_environment, select_probes, tracepoint_exists
from kvmm_daemon.trace.programs import PROBES

PREFIX = "kvmm trace --check:"


def reasons_from_notes(notes, probes) -> dict[str, str]:
    """{probe: why it is not traced} from the notes of select_probes/BpfSession.open
    ("fuse: tracepoint fuse:fuse_request_send missing; ... not traced")."""
    out = {}
    for note in notes:
        name, _, why = note.partition(": ")
        if name in probes and name not in out and why:
            out[name] = why.split("; ")[0]
    return out


def format_line(attached, reasons: dict[str, str], missing: list[str] = ()) -> str:
    """The one line: what attaches, then each probe that does not with its reason."""
    if missing:
        return f"{PREFIX} no probe can attach: {'; '.join(missing)}"
    parts = [f"attach: {', '.join(attached) if attached else 'none'}"]
    if reasons:
        parts.append("cannot: " + "; ".join(f"{p} ({why})" for p, why in reasons.items()))
    return f"{PREFIX} {' | '.join(parts)}"


def check(env: Environment | None = None) -> tuple[bool, str]:
    """(whether any probe attached, the line)."""
    env = env or detect_environment()
    missing = env.missing()
    if missing:
        return False, format_line((), {}, missing)
    selection = select_probes(list(PROBES), lambda tp: tracepoint_exists(env.tracefs, tp))
    try:
        session = BpfSession.open(selection) if selection.enabled else None
    except RuntimeError as exc:
        reasons = reasons_from_notes(selection.notes, PROBES)
        reasons.update({p: str(exc) for p in selection.enabled})
        return False, format_line((), reasons)
    if session is None:
        return False, format_line((), reasons_from_notes(selection.notes, PROBES))
    try:
        attached = list(session.selection.enabled)
        reasons = reasons_from_notes(session.notes, [p for p in PROBES if p not in attached])
    finally:
        session.close()
    return bool(attached), format_line(attached, reasons)
