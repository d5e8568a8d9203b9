"""InodeTable: the inode numbers of the swapfs view and the kernel's lookup counts.

Four directories have fixed inodes; every other node (view_nodes.py) gets an inode when
first named and keeps it while the kernel holds a lookup on it, so `forget` is where an
inode ends (pyfuse3 rst/gotchas.rst: deletion is deferred to forget). Inodes are never
reused within a mount and are not stable across mounts.
"""
from __future__ import annotations

import errno
from collections import Counter

import pyfuse3

from swapfs.view_nodes import FILES, EntryDir, FixedDir, ImportFile, Node

ROOT, SESSIONS, PREFIXES, IMPORT = pyfuse3.ROOT_INODE, 2, 3, 4
FIXED: dict[int, FixedDir] = {ROOT: FixedDir(""), SESSIONS: FixedDir("sessions"),
                              PREFIXES: FixedDir("prefixes"), IMPORT: FixedDir("import")}
DIR_MODES = {ROOT: 0o755, SESSIONS: 0o1777, PREFIXES: 0o700, IMPORT: 0o1733}
_FIXED_INO = {node: ino for ino, node in FIXED.items()}
_FIRST_DYNAMIC = 16


class InodeTable:
    """Attributes (touched only from the trio thread):
      _ino_of / _node_of: dynamic node <-> inode, each the inverse of the other; fixed
        nodes are in neither. A node named but never looked up (a lookup that failed after
        naming it, a readdir entry the kernel's buffer did not take) keeps its inode until
        unmount.
      _lookups: the kernel's lookup count per dynamic inode, every count > 0; `forget`
        bringing it to 0 drops the inode from both maps.
      _next_ino: above every inode handed out.
    """

    def __init__(self) -> None:
        self._ino_of: dict[Node, int] = {}
        self._node_of: dict[int, Node] = {}
        self._lookups: Counter[int] = Counter()
        self._next_ino = _FIRST_DYNAMIC

    @staticmethod
    def is_fixed(ino: int) -> bool:
        return ino in FIXED

    def ino(self, node: Node) -> int:
        """The node's inode, a new one if it has none."""
        if node in _FIXED_INO:
            return _FIXED_INO[node]
        ino = self._ino_of.get(node)
        if ino is None:
            ino = self._next_ino
            self._next_ino += 1
            self._ino_of[node], self._node_of[ino] = ino, node
        return ino

    def node(self, ino: int) -> Node:
        """The node of an inode; ENOENT for one forgotten or never handed out."""
        if ino in FIXED:
            return FIXED[ino]
        try:
            return self._node_of[ino]
        except KeyError:
            raise pyfuse3.FUSEError(errno.ENOENT) from None

    def looked_up(self, ino: int) -> None:
        """The kernel took one more reference (a lookup, a readdirplus entry, a create)."""
        if ino not in FIXED:
            self._lookups[ino] += 1

    def forget(self, ino: int, n: int) -> None:
        if ino in FIXED:
            return
        self._lookups[ino] -= n
        if self._lookups[ino] <= 0:
            del self._lookups[ino]
            node = self._node_of.pop(ino, None)
            if node is not None:
                self._ino_of.pop(node, None)

    def child(self, parent: int, name: str) -> Node:
        """The node `name` in directory `parent` would be (whether it exists or not is the
        caller's to find out); ENOENT where no such name can be."""
        if parent == ROOT:
            for ino, node in FIXED.items():
                if node.name == name and ino != ROOT:
                    return node
            raise pyfuse3.FUSEError(errno.ENOENT)
        if parent == SESSIONS:
            return EntryDir("session", name)
        if parent == PREFIXES:
            return EntryDir("prefix", name)
        if parent == IMPORT:
            return ImportFile(name)
        node = self.node(parent)
        if isinstance(node, EntryDir) and name in FILES:
            return node.file(name)
        raise pyfuse3.FUSEError(errno.ENOENT)

