import re

import pytest

from kvmm_daemon.trace.programs import (CHILDREN_TRACEPOINTS, HISTS, PROBES, TOTALS, build_program,
                                        parse_probe_list)

PROBE_RE = re.compile(r"TRACEPOINT_PROBE\((\w+), (\w+)\)")


def tracepoints(text: str) -> set[str]:
    return {f"{c}:{e}" for c, e in PROBE_RE.findall(text)}


@pytest.mark.parametrize("name", list(PROBES))
def test_each_probe_attaches_exactly_its_tracepoints(name):
    text = build_program([name])
    assert tracepoints(text) == set(PROBES[name].required) | set(PROBES[name].optional)
    assert text.count("{") == text.count("}")


def test_all_probes_and_children():
    text = build_program(list(PROBES), follow_children=True)
    expected = {tp for p in PROBES.values() for tp in (*p.required, *p.optional)} | set(CHILDREN_TRACEPOINTS)
    assert tracepoints(text) == expected
    assert "targets.update(&child, &one)" in text


def test_children_off_by_default():
    assert not tracepoints(build_program(["faults"])) & set(CHILDREN_TRACEPOINTS)


def test_block_without_bio_queue_counts_only_own_issues():
    text = build_program(["block"], bio_queue=False)
    assert tracepoints(text) == {"block:block_rq_issue", "block:block_rq_complete"}
    assert "bio_owner" not in text
    assert "bio_owner.lookup(&sector)" in build_program(["block"])


def test_defines_follow_the_python_layout():
    text = build_program(["syscalls"])
    for i, name in enumerate(TOTALS):
        assert f"#define T_{name.upper()} {i}\n" in text
    for i, name in enumerate(HISTS):
        assert f"#define H_{name.upper()} {i}\n" in text
    assert f"#define N_TOTALS {len(TOTALS)}\n" in text


def test_only_selected_maps_are_declared():
    text = build_program(["syscalls", "faults"])
    assert "sys_stats" in text and "fuse_stats" not in text and "uring_stats" not in text and "rq_start" not in text


def test_build_rejects_unknown_probe():
    with pytest.raises(ValueError, match="unknown probe kprobes"):
        build_program(["syscalls", "kprobes"])


def test_parse_probe_list():
    assert parse_probe_list("offcpu, block") == ["block", "offcpu"]
    assert parse_probe_list("all") == list(PROBES)
    with pytest.raises(ValueError, match="unknown probe nope; choose from block"):
        parse_probe_list("block,nope")
    with pytest.raises(ValueError, match="none given"):
        parse_probe_list(" , ")
