"""eBPF tracing of kvmm's I/O stalls and user/kernel transitions (`kvmm trace`).

Modules, in the order data flows: `programs` (assembles the BPF C text of `bpf_text`),
`probes` (feature detection, compile/attach, map reads), `counters` (map snapshots and their
differences), `procfs` (the /proc fallback), `tracer` (the interval loop), `report` (interval
dict and table), `perfetto` (trace-event JSON timeline); `histogram`, `names`, `target` and
`tokens` help them. The CLI is `kvmm_daemon/commands/trace.py`; docs/trace.md shows it in use.
"""
