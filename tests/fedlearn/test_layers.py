"""The light fedlearn modules stay light: wire messages, signed documents, the event fold and
rule specs import no torch or numba, and import fast (docs/decisions.md, issue 14)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

LIGHT = [
    "hearthnet.fedlearn.protocol",
    "hearthnet.fedlearn.manifest",
    "hearthnet.fedlearn.draft",
    "hearthnet.fedlearn.terms",
    "hearthnet.fedlearn.submission",
    "hearthnet.fedlearn.masks",
    "hearthnet.fedlearn.state",
    "hearthnet.fedlearn.verify",
    "hearthnet.fedlearn.rules.spec",
    "hearthnet.fedlearn.rules.registry",
]
HEAVY = ("torch", "numba", "numpy")
LIMIT_S = 0.3

_PROBE = """
import json, sys, time
t = time.perf_counter()
import {module}
took = time.perf_counter() - t
print(json.dumps({{"took": took, "loaded": [m for m in {heavy!r} if m in sys.modules]}}))
"""


def _import_in_fresh_process(module: str) -> dict[str, object]:
    code = _PROBE.format(module=module, heavy=HEAVY)
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60
    )
    result: dict[str, object] = json.loads(out.stdout.strip().splitlines()[-1])
    return result


@pytest.mark.parametrize("module", LIGHT)
def test_light_module_imports_no_heavy_library(module: str) -> None:
    result = _import_in_fresh_process(module)
    assert result["loaded"] == [], f"{module} loads {result['loaded']}"
    # the best of three, so one slow start on a busy machine does not fail the bound
    took = min(float(str(_import_in_fresh_process(module)["took"])) for _ in range(2))
    took = min(took, float(str(result["took"])))
    assert took < LIMIT_S, f"import of {module} took {took:.3f} s (limit {LIMIT_S} s)"


def test_the_heavy_side_is_heavy() -> None:
    """The probe can fail: the numeric package does load torch and numba."""
    result = _import_in_fresh_process("hearthnet.fedlearn.aggregation.robust")
    assert set(result["loaded"]) >= {"torch", "numba"}  # type: ignore[arg-type]


def test_every_registered_rule_parses_without_the_kernels() -> None:
    code = (
        "import sys\n"
        "from hearthnet.fedlearn.rules.registry import RULES\n"
        "from hearthnet.fedlearn.rules.spec import RuleSpec\n"
        "for r in RULES:\n"
        "    s = RuleSpec.parse(r, {})\n"
        "    s.check(s.minimum_n())\n"
        "assert 'numba' not in sys.modules and 'torch' not in sys.modules\n"
        "print(len(RULES))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60
    )
    assert int(out.stdout.strip()) == 6
