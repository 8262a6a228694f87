"""The bench's own tools, where they compute something a result depends on."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benches"))
import compare  # noqa: E402


# callgrind's format as `--dump-instr=no --demangle=no` writes it: names compressed to "(id)"
# after their first use, "calls=" followed by the call's inclusive cost, recursion levels as
# "name'2", and code with no symbol as an address.
PROFILE = """\
version: 1
creator: callgrind-3.19.0
events: Ir
ob=(1) /usr/lib/x86_64-linux-gnu/libc.so.6
fl=(1) ???
fn=(1) memcpy
0 900
ob=(2) {sidecar}
fl=(2) ???
fn=(2) _ZN5proxy7forward17h0123456789abcdefE
10 30
+2 20
cob=(1)
cfi=(1)
cfn=(1)
calls=3 0
12 900
cfn=(3) _ZN5proxy6decide17hfedcba9876543210E
calls=1 0
14 5000
fn=(3)
20 70
fn=(4) _ZN5proxy6decide17hfedcba9876543210E'2
20 10
fn=(5) 0x0000000000916610
0 400
fn=(6) (below main)
0 1
fn=(2)
16 5
totals: 7336
"""


def test_symbol_order_counts_own_instructions_of_the_binary_only(tmp_path):
    binary = tmp_path / "eastguard-sidecar"
    binary.write_bytes(b"")
    first = tmp_path / "a.order.callgrind"
    first.write_text(PROFILE.format(sidecar=binary))
    # A second profile (the other side, another run) adds to the same functions.
    second = tmp_path / "b.order.callgrind.1"
    second.write_text(PROFILE.format(sidecar=binary).replace("16 5\n", "16 100\n"))
    out = tmp_path / "order"
    compare.write_symbol_order([first, second], [binary], out)
    # forward: own 30 + 20 + 5 (+100) per profile, not the 900 and 5000 its callees cost;
    # decide: 70 + 10 (its recursion level) per profile. libc and unnamed code are left out.
    assert out.read_text().splitlines() == [
        "_ZN5proxy7forward17h0123456789abcdefE",
        "_ZN5proxy6decide17hfedcba9876543210E",
    ]


def test_symbol_order_ranks_by_instructions(tmp_path):
    binary = tmp_path / "eastguard-sidecar"
    binary.write_bytes(b"")
    profile = tmp_path / "a.order.callgrind"
    profile.write_text(PROFILE.format(sidecar=binary).replace("20 70\n", "20 900\n"))
    out = tmp_path / "order"
    compare.write_symbol_order([profile], [binary], out)
    assert out.read_text().splitlines()[0] == "_ZN5proxy6decide17hfedcba9876543210E"
