import platform

import pytest

from kvmm_daemon.trace import names


def test_parse_unistd():
    text = "#ifndef X\n#define __NR_read 0\n#define __NR_write 1\n#define __NR_pread64 17\n" \
           "#define __NR_syscalls 450\n#endif\n"
    table = names.parse_unistd(text)
    assert table[0] == "read" and table[1] == "write" and table[17] == "pread64"


def test_parse_enum_with_implicit_values_comments_and_aliases():
    text = """enum other { X = 9 };
    enum fuse_opcode {
        FUSE_LOOKUP = 1,
        FUSE_FORGET = 2,  /* no reply */
        FUSE_MKNOD  = 8,
        FUSE_MKDIR,       // 9
        CUSE_INIT   = 4096,
        CUSE_INIT_BSWAP_RESERVED = 1048576,
        FUSE_ALIAS  = FUSE_LOOKUP,
    };"""
    table = names.parse_enum(text, "fuse_opcode", "FUSE_")
    assert table == {1: "LOOKUP", 2: "FORGET", 8: "MKNOD", 9: "MKDIR", 4096: "CUSE_INIT",
                     1048576: "CUSE_INIT_BSWAP_RESERVED"}
    ops = names.parse_enum("enum io_uring_op { IORING_OP_NOP, IORING_OP_READV, IORING_OP_LAST, };",
                           "io_uring_op", "IORING_OP_")
    assert ops == {0: "NOP", 1: "READV"}
    assert names.parse_enum(text, "missing", "") == {}


@pytest.mark.skipif(platform.machine() != "x86_64", reason="syscall numbers checked are x86_64's")
def test_machine_tables():
    assert names.syscall_name(0) == "read" and names.syscall_name(17) == "pread64"
    assert names.syscall_name(99999) == "syscall_99999"
    if names.fuse_opcode_table():
        assert names.fuse_opcode_name(15) == "READ"
    if names.io_uring_opcode_table():
        assert names.io_uring_opcode_name(22) == "READ"
    assert names.io_uring_opcode_name(9999) == "op_9999"
