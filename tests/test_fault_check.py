"""Pieces of scripts/fault_check.py inside the suite: its parsing of torchrun's output and log
folders and its choice of the files one rank reads (no launch), then real torchrun launches of
2 "nodes" x 2 processes on loopback (gloo), each fault judged by the harness's own checks
(bounded end, every rank's exit code, no traceback in any rank's log, checkpoints load, rank
0's one line, OUT unchanged).

The whole harness (kill -9 with a restart, SIGTERM to a node, SIGUSR1, a full disk ...) runs
by hand: python scripts/fault_check.py.  No pytest-timeout here: every wait of the harness has
its own bound (Context's timeout), after which it SIGKILLs the launch and reports a hang.
"""
from __future__ import annotations

import importlib.util
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

# What torch 2.14's torchrun printed for two workers that exited 2 (and one it stopped itself).
SUMMARY = """\
W1202 20:43:31.001000 8820 site-packages/torch/distributed/elastic/multiprocessing/api.py:1028] \
Sending process 8978 closing signal SIGTERM
E1202 20:43:31.084000 8820 site-packages/torch/distributed/elastic/multiprocessing/api.py:1002] \
failed (exitcode: 2) local_rank: 0 (pid: 8977) of binary: /usr/bin/python3.11
torch.distributed.elastic.multiprocessing.errors.ChildFailedError:
============================================================
alexnet_train FAILED
------------------------------------------------------------
Failures:
[1]:
  time      : 2026-12-02_20:43:31
  host      : localhost
  rank      : 3 (local_rank: 1)
  exitcode  : -15 (pid: 8978)
  error_file: <N/A>
  traceback : Signal 15 (SIGTERM) received by PID 8978
------------------------------------------------------------
Root Cause (first observed failure):
[0]:
  time      : 2026-12-02_20:43:31
  host      : localhost
  rank      : 2 (local_rank: 0)
  exitcode  : 2 (pid: 8977)
  error_file: <N/A>
  traceback : To enable traceback see: https://pytorch.org/docs/stable/elastic/errors.html
============================================================
"""


@pytest.fixture(scope="module")
def fc():
    spec = importlib.util.spec_from_file_location("fault_check", REPO / "scripts" / "fault_check.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["fault_check"] = module  # dataclasses resolve their module by name
    spec.loader.exec_module(module)
    return module


def test_the_harness_lists_every_fault_the_issue_names(fc):
    assert set(fc.FAULTS) == {"kill9_restart", "sigterm_node_group", "sigusr1", "bad_image_error",
                              "bad_image_skip", "unreadable_batch", "full_disk_rank0", "node_local_out",
                              "schedule_kind_changed"}


def test_torchrun_failure_summary_gives_each_failed_rank_its_code_and_pid(fc):
    assert fc.torchrun_exit_codes(SUMMARY) == {2: (2, 8977), 3: (-15, 8978)}
    assert fc.torchrun_closed(SUMMARY) == {8978: "SIGTERM"}
    assert fc.torchrun_exit_codes("W... Received 15 death signal, shutting down workers\n") == {}


def test_rank_logs_reads_torchruns_log_folder_layout(fc, tmp_path):
    for attempt in (0, 1):
        for local in (0, 1):
            folder = tmp_path / "run-1234_abcd" / f"attempt_{attempt}" / str(local)
            folder.mkdir(parents=True)
            (folder / "stdout.log").write_text(f"attempt {attempt} local {local}\n")
            (folder / "stderr.log").write_text("")
    (tmp_path / "run-1234_abcd" / "attempt_0" / "error.json").write_text("{}")  # not a rank's folder
    logs = sorted(fc.rank_logs(tmp_path), key=lambda log: (log.attempt, log.local_rank))
    assert [(log.attempt, log.local_rank) for log in logs] == [(0, 0), (0, 1), (1, 0), (1, 1)]
    assert logs[3].stdout() == "attempt 1 local 1\n"


def test_each_file_of_an_epoch_is_read_by_exactly_one_rank_at_one_step(fc, tmp_path):
    from alexnet_train.data.loaders import EpochSampler

    root = tmp_path / "tree"
    for cls in ("a", "b", "c"):
        (root / "train" / cls).mkdir(parents=True)
        for i in range(7):  # 21 files: a ragged tail of 5 for 4 ranks x 2 per batch
            (root / "train" / cls / f"{cls}_{i}.JPEG").write_bytes(b"")
    train = root / "train"
    samples = fc.train_samples(train)
    steps = len(samples) // fc.BATCH
    read = [f for rank in range(fc.WORLD) for step in range(1, steps + 1)
            for f in fc.batch_files(train, 2, rank, step)]
    assert len(read) == len(set(read)) == steps * fc.BATCH  # whole batches, nothing read twice
    sampler = EpochSampler(len(samples), fc.SEED, True, 3, fc.WORLD, fc.BATCH // fc.WORLD)
    sampler.set_epoch(1)  # the log's epoch 2
    assert fc.batch_files(train, 2, 3, 1) == [samples[i] for i in sampler.order()[:2]]
    with pytest.raises(ValueError, match="no step"):
        fc.batch_files(train, 2, 3, steps + 1)


def test_the_exit_watcher_sees_the_codes_and_signals_of_processes_it_did_not_start(fc):
    if not fc.WATCHER.start():
        pytest.skip(f"no proc connector here: {fc.WATCHER.problem}")
    done = subprocess.Popen([sys.executable, "-c", "import sys; sys.exit(7)"])
    killed = subprocess.Popen(["sleep", "30"])
    killed.kill()
    done.wait()
    killed.wait()
    deadline = time.monotonic() + 2
    while time.monotonic() < deadline and None in (fc.WATCHER.code(done.pid), fc.WATCHER.code(killed.pid)):
        time.sleep(0.01)
    assert (fc.WATCHER.code(done.pid), fc.WATCHER.code(killed.pid)) == (7, -9)


@pytest.fixture(scope="module")
def ctx(fc, tmp_path_factory):
    """One work folder for the launches below, so they share the data and the reference run."""
    context = fc.Context(tmp_path_factory.mktemp("fault_check"), timeout=150)
    yield context
    context.cleanup()


@pytest.mark.slow
# One launch in the suite (the harness's own plumbing, end to end); tests/test_ddp_agreement.py
# covers the other faults with 2 ranks, and python scripts/fault_check.py runs them all.
@pytest.mark.parametrize("fault, expected", [("bad_image_error", 1)])
def test_a_fault_on_two_torchrun_nodes_ends_every_rank_as_documented(fc, ctx, fault, expected):
    outcome = fc.run_fault(ctx, fault)
    assert outcome.status == "clean", "\n".join(outcome.problems)
    launches = outcome.details["launches"]
    assert launches and not any(launch["hung"] for launch in launches)
    for launch in launches:  # every one of the 4 ranks was seen to exit, with the code the fault documents
        codes = launch["rank_exit"]
        assert sorted(codes) == ["0", "1", "2", "3"] and {v["code"] for v in codes.values()} == {expected}
