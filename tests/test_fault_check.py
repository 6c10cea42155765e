"""Pieces of scripts/fault_check.py inside the suite: real torchrun launches of 2 "nodes" x 2
processes on loopback (gloo), each fault judged by the harness's own checks (bounded end,
every rank's exit code, no traceback in any rank's log, checkpoints load, rank 0's one line).

The whole harness (kill -9 with a restart, SIGTERM to a node, SIGUSR1, a full disk ...) runs
by hand: python scripts/fault_check.py.
"""
from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.slow


def _harness():
    spec = importlib.util.spec_from_file_location("fault_check", REPO / "scripts" / "fault_check.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["fault_check"] = module  # dataclasses resolve their module by name
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("fault", ["bad_image_error", "schedule_kind_changed"])
def test_a_fault_on_two_torchrun_nodes_ends_every_rank_as_documented(fault, tmp_path):
    fc = _harness()
    ctx = fc.Context(tmp_path / "work", timeout=150)
    outcome = fc.run_fault(ctx, fault)
    assert outcome.status == "clean", "\n".join(outcome.problems)
    launches = outcome.details["launches"]
    assert launches and not any(launch["hung"] for launch in launches)
    # Every one of the 4 ranks was seen to exit, with the code the fault documents.
    expected = {"bad_image_error": 1, "schedule_kind_changed": 2}[fault]
    last = launches[-1]["rank_exit"]
    assert sorted(last) == ["0", "1", "2", "3"] and {v["code"] for v in last.values()} == {expected}


def test_the_harness_lists_every_fault_the_issue_names():
    fc = _harness()
    assert set(fc.FAULTS) == {"kill9_restart", "sigterm_node_group", "sigusr1", "bad_image_error",
                              "bad_image_skip", "unreadable_batch", "full_disk_rank0", "node_local_out",
                              "schedule_kind_changed"}
