"""Every method on a tiny model of each architecture (the cells of ``tests/integration/architectures.py``) and the
support table in docs/model-types.md.

A cell passes when the method runs and matches its independent computation, or when the package refuses the model
with a clear error of its own; the outcome ("yes" or the refusal) goes into the support table that docs/model-types.md
holds between ``<!-- architectures:start -->`` and ``<!-- architectures:end -->``, checked by the last test here.
"""

from __future__ import annotations

import re

import pytest
import transformers

import tests.integration.architectures as sweep

#: This session's outcome of every cell that ran: ``"yes"``, ``"refused: ..."`` or ``"FAIL"``.
RESULTS: dict[tuple[str, str], str] = {}


def _case_id(case: str) -> str:
    return case.replace(" (", "-").replace(")", "")


@pytest.fixture(scope="module", params=list(sweep.CASES), ids=_case_id)
def built(request):
    """``(case, spec, model)``: one model per architecture, shared by its cells."""
    case = request.param
    reason = sweep.missing(case)
    if reason is not None:
        pytest.skip(reason)
    for method in sweep.METHODS:
        RESULTS[case, method] = "FAIL"  # until its cell says otherwise (the build itself may fail)
    return (case, *sweep.build(case))


@pytest.mark.parametrize("method", list(sweep.METHODS))
def test_cell(built, method):
    case, spec, model = built
    RESULTS[case, method] = sweep.run_cell(method, spec, model)


def test_docs_table_is_the_one_this_sweep_gives():
    """docs/model-types.md's table equals the one this session's outcomes give, when every cell ran and none failed."""
    cells = {(case, method) for case in sweep.CASES for method in sweep.METHODS}
    if set(RESULTS) != cells:
        pytest.skip(f"{len(cells - set(RESULTS))} of {len(cells)} architecture cells did not run in this session")
    failed = sorted(f"{case}/{method}" for (case, method), outcome in RESULTS.items() if outcome == "FAIL")
    if failed:
        pytest.skip(f"no table from a sweep with failed cells: {', '.join(failed)}")
    section = sweep.table_section(sweep.PAGE.read_text())
    if section is None:
        pytest.skip(f"{sweep.PAGE.name} has no {sweep.START} ... {sweep.END} markers around the architecture table")
    version = sweep.table_version(section)
    if version is not None and version != transformers.__version__:
        pytest.skip(f"{sweep.PAGE.name}'s table is of transformers {version}, this is {transformers.__version__}")
    # Measured figures in refusal messages (a relative difference, say) may differ in their last digits elsewhere.
    assert _without_figures(section) == _without_figures(sweep.support_table(RESULTS)), (
        "docs/model-types.md's architecture table is not this sweep's; regenerate it with "
        "`.venv/bin/python -m tests.integration.architectures --write-docs`")


def _without_figures(text: str) -> str:
    return re.sub(r"\d+\.\d+(e-?\d+)?", "<figure>", text)
