"""fastlb/constants.pxd (what Cython cimports) and fastlb/constants.py (what Python imports) hold the same
names with the same values: one may not change without the other."""
import re
from pathlib import Path

import fastlb.constants

PXD = Path(fastlb.constants.__file__).with_suffix(".pxd")


def pxd_values() -> dict[str, int]:
    values = {}
    for line in PXD.read_text().splitlines():
        match = re.fullmatch(r"\s+([A-Z][A-Z0-9_]*)\s*=\s*(\d+)\s*(#.*)?", line)
        if match:
            values[match.group(1)] = int(match.group(2))
    return values


def test_python_twin_equals_the_pxd():
    python = {name: value for name, value in vars(fastlb.constants).items() if name.isupper()}
    assert pxd_values() == python


def test_values_within_a_group_are_distinct():
    # the enums group by prefix; a copy-paste slip giving two kinds one value would merge them silently
    for prefix in ("STICKY_", "WAIT_", "PAUSE_", "KEY_", "RATE_KEY_", "MISSING_"):
        group = {name: value for name, value in pxd_values().items() if name.startswith(prefix)}
        assert len(set(group.values())) == len(group), group
