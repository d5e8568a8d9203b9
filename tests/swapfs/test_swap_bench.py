import argparse

from swapfs.bench import register_args, run_swap_bench


def test_bench_reports_ratios_against_plain_o_direct(swap_dir, capsys):
    parser = argparse.ArgumentParser()
    register_args(parser)
    args = parser.parse_args(["--dir", swap_dir, "--total-mib", "8", "--batch-blocks", "4",
                              "--repeats", "1", "--threads", "2"])
    result = run_swap_bench(args)
    for key in ("swap_out_bandwidth_ratio", "swap_in_bandwidth_ratio", "swap_out_gbps",
                "swap_in_gbps", "plain_write_gbps", "plain_read_gbps", "persist_gbps"):
        assert result[key] > 0, key
    assert result["direct_io"] and result["block_bytes"] == 737280
    assert abs(result["swap_in_bandwidth_ratio"]
               - result["swap_in_gbps"] / result["plain_read_gbps"]) < 1e-9
    out = capsys.readouterr().out
    assert "ratio" in out and "plain O_DIRECT" in out
