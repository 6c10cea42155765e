"""The units the training step loop is made of, each on its own: what ranks agree on
(RankAgreement, in one process and over 2 real gloo processes), when a mid-epoch checkpoint
is due (SaveSchedule), the log window (LogWindow) and the loader's errors."""
from __future__ import annotations

import multiprocessing as mp
import os
import time
import traceback

import pytest
import torch

from alexnet_train.agreement import Decision, RankAgreement
from alexnet_train.checkpoint import SaveSchedule
from alexnet_train.data.datasets import BadImageError, BadImages, TooManyBadImages
from alexnet_train.distributed import DistInfo
from alexnet_train.logwindow import LogWindow
from alexnet_train.tracking import Tracker
from alexnet_train.data.loaders import _worker_killed, loader_failure
from alexnet_train.errors import LoaderFailed, run_errors


def _agreement(dist: DistInfo, policy: str, log: list, counted: list, max_fraction: float = 0.5) -> RankAgreement:
    bad = BadImages(policy, max_fraction, {"train": 10, "val": 4}, log.append)
    return RankAgreement(dist, torch.device("cpu"), bad, run_errors(), counted.append)


def test_in_one_process_every_decision_is_taken_at_once():
    log, counted = [], []
    agreement = _agreement(DistInfo(), "skip", log, counted)
    agreement.unreadable([("a.JPEG", "truncated")], "train")
    assert counted == [1] and log == ["warning: skipping a.JPEG: unreadable image (truncated)"]
    assert agreement.decide(15, True, False) == Decision(stop=15, save=True, nonfinite=False)
    agreement.settle()  # nothing held, nothing to do
    with pytest.raises(LoaderFailed):
        agreement.fail(LoaderFailed("the data loader failed: x"))
    with pytest.raises(TooManyBadImages, match="6 of the 10 train images"):
        agreement.unreadable([(f"b{i}.JPEG", "empty") for i in range(5)], "train")
    with pytest.raises(BadImageError, match="c.JPEG"):
        _agreement(DistInfo(), "error", [], []).unreadable([("c.JPEG", "empty")], "val")


SCENARIOS = ("stop_and_save", "bad_image_error", "bad_image_skip", "too_many")


def _rank(rank: int, store: str, results) -> None:
    """One of two gloo ranks: runs every scenario, each with a fresh RankAgreement, and puts
    what it saw on ``results`` (one process group for all: a launch costs seconds)."""
    import torch.distributed as tdist

    os.environ["GLOO_SOCKET_IFNAME"] = "lo"
    try:
        tdist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=2,
                                 timeout=__import__("datetime").timedelta(seconds=30))
        dist = DistInfo(rank=rank, world_size=2, local_rank=rank)
        seen_all = {scenario: _scenario(scenario, dist, rank) for scenario in SCENARIOS}
        tdist.barrier()
        tdist.destroy_process_group()
        results.put((rank, seen_all))
    except BaseException:  # noqa: BLE001 - reported to the test, which fails on it
        results.put((rank, {"crash": traceback.format_exc()}))


def _scenario(scenario: str, dist: DistInfo, rank: int) -> dict:
    log, counted = [], []
    policy = "error" if scenario == "bad_image_error" else "skip"
    agreement = _agreement(dist, policy, log, counted, max_fraction=0.3)
    seen = {}
    if scenario == "stop_and_save":
        # Rank 1 alone has a signal, rank 0 alone a checkpoint due: both do both.
        seen["decision"] = agreement.decide(15 if rank == 1 else 0, rank == 0, False)
    elif scenario in ("bad_image_error", "bad_image_skip", "too_many"):
        files = {"bad_image_error": [("r1.JPEG", "truncated")], "bad_image_skip": [("r1.JPEG", "truncated")],
                 "too_many": [(f"r{rank}-{i}.JPEG", "empty") for i in range(2)]}[scenario]
        if rank == 1 or scenario == "too_many":
            agreement.unreadable(files, "train")  # held under DDP: nothing raised here
        seen["held"] = agreement.failure is not None
        try:
            seen["decision"] = agreement.decide(0, False, False)
        except Exception as exc:  # noqa: BLE001 - what each rank raised is the result
            seen["raised"] = (type(exc).__name__, str(exc), getattr(exc, "report", None))
    seen["log"], seen["counted"] = log, counted
    return seen


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory) -> dict:
    """{scenario: {rank: what it saw}} from one launch of 2 gloo processes."""
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    store = tmp_path_factory.mktemp("agreement") / "store"
    procs = [ctx.Process(target=_rank, args=(r, str(store), results)) for r in range(2)]
    for p in procs:
        p.start()
    seen = {}
    try:
        for _ in range(2):
            rank, value = results.get(timeout=90)  # a hang is a failure, not a stuck suite
            seen[rank] = value
    finally:
        for p in procs:
            p.join(timeout=10)
            if p.is_alive():
                p.kill()
    for rank, value in seen.items():
        assert "crash" not in value, f"rank {rank}:\n{value['crash']}"
    return {scenario: {rank: seen[rank][scenario] for rank in seen} for scenario in SCENARIOS}


@pytest.mark.slow
def test_two_ranks_agree_on_a_stop_and_a_save_that_one_rank_saw(two_ranks):
    seen = two_ranks["stop_and_save"]
    assert seen[0]["decision"] == seen[1]["decision"] == Decision(stop=15, save=True, nonfinite=False)


@pytest.mark.slow
def test_an_unreadable_image_on_one_rank_under_error_fails_both_ranks_with_one_report(two_ranks):
    seen = two_ranks["bad_image_error"]
    assert (seen[0]["held"], seen[1]["held"]) == (False, True)  # rank 1 held it, raised nothing alone
    message = "rank 1: r1.JPEG: unreadable image (truncated)"
    assert seen[0]["raised"][:2] == seen[1]["raised"][:2] == ("BadImageError", seen[0]["raised"][1])
    assert message in seen[0]["raised"][1]
    assert (seen[0]["raised"][2], seen[1]["raised"][2]) == (True, False)  # rank 0 alone prints it


@pytest.mark.slow
def test_skipped_files_of_one_rank_are_logged_and_counted_on_every_rank(two_ranks):
    seen = two_ranks["bad_image_skip"]
    for rank in (0, 1):
        assert seen[rank]["decision"] == Decision(0, False, False)
        assert seen[rank]["counted"] == [0, 1]  # rank 0's none, rank 1's one
        assert seen[rank]["log"] == ["warning: skipping r1.JPEG: unreadable image (truncated)"]


@pytest.mark.slow
def test_unreadable_images_are_counted_over_all_ranks_against_the_fraction(two_ranks):
    # 2 per rank: 4 of 10 > 30% only when both ranks' files count.
    seen = two_ranks["too_many"]
    for rank in (0, 1):
        name, message, report = seen[rank]["raised"]
        assert name == "TooManyBadImages" and "4 of the 10 train images" in message
        assert report == (rank == 0)


def test_save_schedule_steps_and_minutes():
    steps = SaveSchedule(steps=5, minutes=0)
    assert [s for s in range(1, 16) if steps.steps_due(s, at_epoch_end=False)] == [5, 10, 15]
    assert not steps.steps_due(10, at_epoch_end=True)  # the epoch's own save is coming
    assert not steps.time_due(at_epoch_end=False)
    timed = SaveSchedule(steps=0, minutes=0.1 / 60)  # 0.1 s
    assert not timed.time_due(False) and not timed.steps_due(100, False)
    time.sleep(0.15)
    assert timed.time_due(False) and not timed.time_due(True)
    timed.saved()
    assert not timed.time_due(False)


def test_log_window_measures_the_wait_for_data_and_adds_each_interval_to_the_epoch():
    totals = {"loss_sum": 0.0, "images": 0, "seconds": 0.0, "data_seconds": 0.0, "bad_images": 0}
    window = LogWindow(totals, interval=2, world_size=2, device=torch.device("cpu"),
                       tracker=Tracker(None, enabled=False), workers=1)

    def slow_batches():
        for i in range(3):
            time.sleep(0.05)
            yield i

    class Bar:
        fields: dict = {}

        def set(self, **fields):
            Bar.fields = fields

    steps = 0
    for _ in window.timed(slow_batches()):
        steps += 1
        window.add(torch.tensor(4.0), 4)
        if window.should_log(steps, at_end=steps == 3):
            window.log(window.read(), 0.01, steps, Bar())
            if steps == 2:
                assert totals["images"] == 8 and totals["loss_sum"] == 8.0 and window.images == 0
                assert 0.09 < totals["data_seconds"] < 0.5 and Bar.fields["loss"] == 1.0
    window.add(None, 0)  # a step without a batch adds nothing
    assert totals["images"] == 12 and totals["loss_sum"] == 12.0 and float(window.loss) == 0.0
    assert 0.14 < totals["data_seconds"] <= totals["seconds"]
    assert Bar.fields["img_s"] > 0 and 0 < Bar.fields["data_wait"] <= 1


def test_a_worker_killed_mid_send_is_a_dead_worker_not_a_network_error():
    # SIGKILL can reach a worker while it writes a batch: the main process then reads a broken
    # pipe before the DataLoader notices the death. With a stop under way that is the end of
    # the data (SIGTERM to the process group), and otherwise one line that says what happened.
    reset = ConnectionResetError(104, "Connection reset by peer")
    assert _worker_killed(reset) and _worker_killed(EOFError())
    assert _worker_killed(RuntimeError("DataLoader worker (pid 12) is killed by signal: Terminated."))
    assert not _worker_killed(RuntimeError("CUDA out of memory"))
    assert loader_failure(reset) == "a DataLoader worker died while sending a batch ([Errno 104] Connection reset by peer)"
