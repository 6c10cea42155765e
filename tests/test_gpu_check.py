"""scripts/gpu_check.py on the CPU: the plan, a run that keeps to its budget, a report that survives SIGKILL,
a cut part whose whole process group goes, and the peak-memory wrapper every CUDA part runs in.

Each runs the real script as a subprocess on a tiny real ImageFolder of JPEGs; no timing
is asserted except the budget, which is the script's contract (it must never overrun).
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest

from .conftest import CLASSES, REPO, write_image_folder

pytestmark = pytest.mark.slow

SCRIPT = REPO / "scripts" / "gpu_check.py"
PARTS = ["smoke", "cuda_guards", "lrn", "bench_model", "breakdown", "loader", "paper_run", "bench_train_worker",
         "bench_train_device", "cuda_tests", "compiled"]


def _import_gpu_check():
    sys.path.insert(0, str(REPO / "scripts"))
    try:
        import gpu_check
    finally:
        sys.path.pop(0)
    return gpu_check


@pytest.fixture
def tree(tmp_path):
    return write_image_folder(tmp_path / "data", CLASSES, 4, size=300)


def _cleanup(report: dict | None) -> None:
    """What a SIGKILLed check could not clean up itself: a running part's group, its work dir."""
    if not report:
        return
    for part in report["parts"]:
        if part.get("pgid"):
            try:
                os.killpg(part["pgid"], signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
    shutil.rmtree(report.get("work_dir") or "/nonexistent", ignore_errors=True)


def _alive(pid: int) -> bool:
    """Whether the process runs (a zombie has ended; Linux: reads /proc)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def _wait_gone(pid: int, seconds: float = 10) -> bool:
    until = time.monotonic() + seconds
    while _alive(pid) and time.monotonic() < until:
        time.sleep(0.1)
    return not _alive(pid)


def test_plan_prints_every_part_with_its_share_and_writes_no_report(tmp_path):
    report = tmp_path / "out" / "r.json"
    done = subprocess.run([sys.executable, str(SCRIPT), "--plan", "--budget", "120", "--report", str(report)],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    lines = done.stdout.splitlines()
    assert "budget 120 s" in done.stdout and "the CPU (no CUDA GPU found" in done.stdout
    for name in PARTS:
        row = next(line for line in lines if line.startswith(name + " "))
        # a share and the seconds planned, or why it would not run
        assert "%" in row or "skipped: " in row, row
    assert "skipped: no GPU" in next(line for line in lines if line.startswith("compiled "))
    assert not (tmp_path / "out").exists()


def test_a_run_keeps_to_its_budget_and_says_what_it_skipped(tree, tmp_path):
    report = tmp_path / "r.json"
    started = time.monotonic()
    done = subprocess.run([sys.executable, str(SCRIPT), "--data", str(tree), "--report", str(report),
                           "--budget", "40"], capture_output=True, text=True, timeout=90)
    wall = time.monotonic() - started
    assert wall < 40 + 5, f"took {wall:.1f} s on a 40 s budget"
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-2000:]
    r = json.loads(report.read_text())
    assert r["finished"] is True and r["exit_code"] == 0 and r["budget_s"] == 40 and r["gpu"] is False
    assert [p["name"] for p in r["parts"]] == PARTS
    status = {p["name"]: p for p in r["parts"]}
    assert status["smoke"]["status"] == "done"
    smoke = status["smoke"]["figures"]["variants"]
    assert [v["variant"] for v in smoke] == ["fp32", "tf32", "bf16", "fp16", "bf16+channels_last"]
    assert all(v["finite"] is True and v["seconds"] > 0 for v in smoke)
    assert status["compiled"]["status"] == "skipped" and status["compiled"]["reason"].startswith("no GPU")
    # 40 s cannot hold every part: the later ones are skipped for the budget (or cut), each saying why
    short = [p for p in r["parts"] if p["status"] in ("cut", "skipped") and p["name"] != "compiled"]
    assert short and all(p["reason"] for p in short)
    assert any(p["reason"].startswith("budget: needs at least") or p["status"] == "cut" for p in short)
    assert all(p["status"] in ("done", "cut", "skipped") for p in r["parts"])
    text = report.with_suffix(".txt").read_text()
    assert "NO GPU FOUND" in text and "budget 40 s" in text and "finished after" in text
    assert "1. smoke [done" in text and "host syncs not counted on a CPU" in text
    # peak GPU memory: recorded for every part that trains or benchmarks, and on a CPU it says why not
    assert all(v["gpu_memory"] == {"measured": False, "why": "no CUDA: the smoke part ran on the CPU"}
               for v in smoke)
    assert status["smoke"]["figures"]["gpu_memory"]["measured"] is False
    assert text.strip().splitlines()[-1] in done.stdout  # printed at the end too


def test_every_measured_part_runs_in_the_peak_memory_wrapper(tree, tmp_path):
    """The parts that train or benchmark run under ``--worker peak``; on a CPU each says why nothing was measured.

    Every other part is skipped so that lrn, a measured part that runs on a CPU, gets the budget on any
    machine: behind a full smoke part a slow VM may reach none of them.  (The wrapper is one code path for all.)
    """
    report = tmp_path / "r.json"
    others = [p for p in PARTS if p != "lrn"]
    done = subprocess.run([sys.executable, str(SCRIPT), "--data", str(tree), "--report", str(report),
                           "--budget", "25", "--skip", *others], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-2000:]
    r = json.loads(report.read_text())
    status = {p["name"]: p for p in r["parts"]}
    assert all(status[name]["status"] == "skipped" and status[name]["reason"] == "--skip" for name in others)
    part = status["lrn"]
    assert part["status"] in ("done", "cut"), part
    assert part["figures"]["gpu_memory"] == {"measured": False, "why": "no CUDA device in this process"}, part
    text = report.with_suffix(".txt").read_text()
    assert "peak GPU memory: not measured (no CUDA device in this process)" in text


def test_a_sigkilled_check_leaves_a_report_of_the_parts_it_finished(tree, tmp_path):
    report = tmp_path / "r.json"
    proc = subprocess.Popen([sys.executable, str(SCRIPT), "--data", str(tree), "--report", str(report)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    r = None
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and proc.poll() is None:
            if report.exists():
                r = json.loads(report.read_text())  # replaced atomically: always whole
                if any(p["status"] == "running" and p.get("pgid") for p in r["parts"][1:]):
                    break
            time.sleep(0.2)
        else:
            pytest.fail(f"no second part started within 120 s (exit {proc.poll()}): {r}")
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
        r = json.loads(report.read_text())
        assert r["finished"] is False and r["exit_code"] is None
        running = next(i for i, p in enumerate(r["parts"]) if p["status"] == "running")
        assert running >= 1 and r["parts"][running]["pgid"]
        for part in r["parts"][:running]:
            assert part["status"] in ("done", "skipped"), part
        smoke = r["parts"][0]
        assert smoke["status"] == "done" and len(smoke["figures"]["variants"]) == 5 and smoke["seconds"] > 0
        assert all(p["status"] in ("pending", "skipped") for p in r["parts"][running + 1:])
        assert "NOT FINISHED" in report.with_suffix(".txt").read_text()
        if sys.platform.startswith("linux"):  # the running part went with the check (PR_SET_PDEATHSIG)
            assert _wait_gone(r["parts"][running]["pgid"])
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=30)
        _cleanup(r)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_a_cut_part_loses_its_whole_process_group_even_what_ignores_sigterm(tmp_path):
    """The deadline's SIGTERM, then SIGKILL, reach the part's children too (DataLoader workers, pytest's)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("gpu_check_under_test", SCRIPT)
    gpu_check = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = gpu_check  # dataclasses look their module up
    try:
        spec.loader.exec_module(gpu_check)
        check = gpu_check.Check(gpu_check.parse_args(["--plan", "--budget", "60"]))
        # a leader and a child that both ignore SIGTERM, as a stuck worker would
        code = ("import signal, subprocess, sys, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); "
                "c = subprocess.Popen([sys.executable, '-c', 'import signal, time; "
                "signal.signal(signal.SIGTERM, signal.SIG_IGN); time.sleep(60)']); "
                "print('child', c.pid, flush=True); print('half a line', end='', flush=True); time.sleep(60)")
        seen = []
        started = time.monotonic()
        ran = check.run("t", [sys.executable, "-c", code], time.monotonic() + 3, "its share ran out",
                        on_line=lambda at, line: seen.append(line), echo=False)
        took = time.monotonic() - started
        assert ran.cut == "its share ran out" and ran.rc == -signal.SIGKILL
        assert 3 <= took < 3 + gpu_check.GRACE_S + 2, took
        assert ran.partial == "half a line"  # the unfinished last line, as pytest -v leaves its running test
        child = int(next(line for line in seen if line.startswith("child ")).split()[1])
        assert _wait_gone(child)
    finally:
        sys.modules.pop(spec.name, None)
        shutil.rmtree(getattr(locals().get("check"), "work", "/nonexistent"), ignore_errors=True)


def test_on_a_gpu_the_guard_tests_run_second_and_finish_inside_a_300_s_budget():
    """fp16's step 2, the device per rank and the sync-free step must be checked in any window
    of 300 s, even when the smoke part takes all of its time (plus the probe's worst case)."""
    gpu_check = _import_gpu_check()
    names = [s.name for s in gpu_check.SPECS]
    assert names[:2] == ["smoke", "cuda_guards"]
    left = 300 - gpu_check.MARGIN_S - gpu_check.PROBE_S
    shares = [s.gpu[0] for s in gpu_check.SPECS]
    smoke = max(gpu_check.SPECS[0].gpu[1], left * shares[0] / sum(shares))
    left -= smoke
    share, need = gpu_check.SPECS[1].gpu
    guards = max(need, left * share / sum(shares[1:]))
    assert guards >= need and smoke + guards <= 300 - gpu_check.MARGIN_S - gpu_check.PROBE_S


def test_peak_figures_are_recorded_in_bytes_and_gib_and_printed():
    gpu_check = _import_gpu_check()
    m = gpu_check.memory_figures(3 * 2**30, 7 * 2**29)
    assert m == {"measured": True, "max_memory_allocated": 3 * 2**30, "max_memory_reserved": 7 * 2**29,
                 "allocated_gib": 3.0, "reserved_gib": 3.5}
    assert gpu_check.memory_text(m) == ("peak GPU memory 3.00 GiB allocated, 3.50 GiB reserved "
                                        "(torch.cuda.max_memory_allocated / max_memory_reserved)")
    assert gpu_check.memory_text(gpu_check.memory_figures(None, 5, "no CUDA")) == \
        "peak GPU memory: not measured (no CUDA)"
    assert gpu_check.memory_text(None) == "peak GPU memory: not recorded"
    # a part's line in the report, from its figures as the JSON holds them
    report = {"versions": {}, "environment": {}, "decoder": {}, "device": "d", "host": "h", "notes": [],
              "wheels": None, "data": None, "finished": True, "interrupted": None, "budget_s": 60.0,
              "hard_stop_s": 56.0, "seconds": 1.0, "exit_code": 0,
              "parts": [{"name": "paper_run", "title": "t", "status": "done", "reason": None, "seconds": 1.0,
                         "allotted_s": 2.0, "figures": {"gpu_memory": m}}]}
    assert "     " + gpu_check.memory_text(m) in gpu_check.text_lines(report)


def test_the_peak_wrapper_runs_a_script_as_main_with_its_argv_and_exit_and_records_its_peak(tmp_path):
    """The wrapper is what every CUDA part runs in: the script must behave as under plain python (its
    __main__, argv, dataclasses, exit code), and the record says the peak, or on a CPU why there is none."""
    import torch

    script = tmp_path / "part.py"
    script.write_text(
        "import dataclasses, sys\n"
        "import torch\n"
        "@dataclasses.dataclass\n"
        "class Row:\n"
        "    n: int\n"
        "if __name__ == '__main__':\n"
        "    if torch.cuda.is_available():\n"
        "        x = torch.empty(64 * 2**20, dtype=torch.uint8, device='cuda')\n"
        "        del x\n"
        "    print('argv', sys.argv[1:], Row(len(sys.argv)), flush=True)\n"
        "    sys.exit(3)\n")
    out = tmp_path / "peak.json"
    done = subprocess.run([sys.executable, str(SCRIPT), "--worker", "peak", str(out), str(script), "a", "--b=1"],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 3, done.stderr[-2000:]
    assert "argv ['a', '--b=1'] Row(n=3)" in done.stdout
    peak = json.loads(out.read_text())
    if torch.cuda.is_available():
        assert peak["measured"] is True and peak["max_memory_allocated"] >= 64 * 2**20
        assert peak["max_memory_reserved"] >= peak["max_memory_allocated"]
    else:
        assert peak == {"measured": False, "why": "no CUDA device in this process"}


def test_the_peak_wrapper_runs_a_module_as_python_m_does(tmp_path):
    """paper_run's form: python -m alexnet_train ..., here alexnet-summary of the demo config."""
    out = tmp_path / "peak.json"
    done = subprocess.run([sys.executable, str(SCRIPT), "--worker", "peak", str(out), "-m", "alexnet_train",
                           "summary", "--config", str(REPO / "configs" / "demo.yaml")],
                          capture_output=True, text=True, timeout=120, cwd=tmp_path)
    plain = subprocess.run([sys.executable, "-m", "alexnet_train", "summary", "--config",
                            str(REPO / "configs" / "demo.yaml")], capture_output=True, text=True, timeout=120,
                           cwd=tmp_path)
    assert done.returncode == plain.returncode == 0, done.stderr[-2000:]
    assert done.stdout == plain.stdout and "features.0      Conv2d" in done.stdout
    assert json.loads(out.read_text())["measured"] is False  # summary builds on the CPU: no CUDA used
    bad = subprocess.run([sys.executable, str(SCRIPT), "--worker", "peak", str(out)], capture_output=True,
                         text=True, timeout=60)
    assert bad.returncode == 2 and "--worker peak OUT.json" in bad.stderr
