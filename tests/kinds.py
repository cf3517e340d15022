"""A pytest plugin for collection only: the kinds of bad input and fault the suite's tests mark
(`@pytest.mark.bad_input(kind, ...)`, `@pytest.mark.fault(kind, ...)`), written as JSON to $LORAFA_KINDS_OUT —
what docs/testing.md counts (`test_checks.py::test_the_testing_page_counts_the_kinds_the_tests_mark`).

    LORAFA_KINDS_OUT=kinds.json python -m pytest --collect-only -q -p tests.kinds
"""

import json
import os


def pytest_collection_finish(session):
    kinds = {"bad_input": {}, "fault": {}}
    for item in session.items:
        for name, found in kinds.items():
            for mark in item.iter_markers(name):
                for kind in mark.args:
                    found.setdefault(kind, []).append(item.nodeid)
    with open(os.environ["LORAFA_KINDS_OUT"], "w") as f:
        json.dump(kinds, f, indent=1, sort_keys=True)
