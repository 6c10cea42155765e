"""The lines a user pastes run as printed (issue 34).

README's crontab line and docs/fault-tolerance.md's retry loop are read from the pages and
run from a fresh clone (the repository's tracked files only: no ``runs/``), under cron's
bare environment (``env -i`` with HOME, LOGNAME, SHELL=/bin/sh and PATH=/usr/bin:/bin: no
venv, no alexnet-train on PATH).  The clone holds ``.venv`` as README's install makes it
(here a link to the environment these tests run in).  Only the paths a user fills in are
substituted: where the clone is (``/srv/alexnet``) and where the data is
(``/data/imagenet256``).  The data is a real ImageFolder of JPEGs with the 1000 class
folders configs/paper.yaml expects, so the paper's model trains on it as printed.

Every wait has a deadline, so a hang fails the test.
"""
from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from .conftest import REPO, console_script, write_image_folder
from .test_docs import code_blocks, crontab_command

CLONE = "/srv/alexnet"  # where README's crontab line has the clone
DATA = "/data/imagenet256"  # where the pasted lines have the data
DEADLINE = 180  # seconds for any one thing to happen in the log

pytestmark = pytest.mark.slow


def cron_env(home: Path) -> dict[str, str]:
    """What cron gives a job: nothing of the user's shell."""
    return {"HOME": str(home), "LOGNAME": "root", "SHELL": "/bin/sh", "PATH": "/usr/bin:/bin"}


def fresh_clone(root: Path) -> Path:
    """The repository's tracked files (as they are in the working tree) and a .venv as README's
    install leaves one: the environment these tests run in."""
    if not (REPO / ".git").exists() or shutil.which("git") is None:
        pytest.skip("needs a git checkout of the repository")
    names = subprocess.run(["git", "-C", str(REPO), "ls-files", "-z"], capture_output=True, check=True,
                           timeout=60).stdout.decode().split("\0")
    for name in filter(None, names):
        source = REPO / name
        if source.is_file():
            (root / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, root / name)
    venv = root / ".venv"
    if sys.prefix != sys.base_prefix:  # running in a venv (CI's, made by README's install)
        venv.symlink_to(sys.prefix, target_is_directory=True)
    else:  # a Python of its own: the installed console script, where .venv/bin would have it
        (venv / "bin").mkdir(parents=True)
        (venv / "bin" / "alexnet-train").symlink_to(console_script("alexnet-train"))
    assert not (root / "runs").exists()
    return root


@pytest.fixture(scope="module")
def imagenet256(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """1000 class folders (paper.yaml's model.num_classes), one JPEG each in train and val."""
    root = tmp_path_factory.mktemp("imagenet256")
    classes = [f"n{i:08d}" for i in range(1000)]
    write_image_folder(root / "train", classes, 1, size=64, seed=1)
    write_image_folder(root / "val", classes, 1, size=64, seed=2)
    return root


def pasted(text: str, clone: Path, data: Path) -> str:
    assert CLONE in text or DATA in text, text
    return text.replace(CLONE, str(clone)).replace(DATA, str(data))


def readme_crontab_line() -> str:
    lines = [line for lang, body in code_blocks(REPO / "README.md") if lang == "crontab"
             for line in body.splitlines() if line.strip()]
    assert len(lines) == 1, lines
    return lines[0]


def retry_loop() -> str:
    loops = [body for lang, body in code_blocks(REPO / "docs" / "fault-tolerance.md")
             if lang == "bash" and body.startswith("until ")]
    assert len(loops) == 1, loops
    return loops[0]


def cron_job(tmp_path: Path) -> tuple[Path, Path, Path, Path]:
    """A fresh clone, cron's HOME, the file cron would mail the job's output to, and the run's log."""
    clone = fresh_clone(tmp_path / "alexnet")
    home = tmp_path / "home"
    home.mkdir()
    return clone, home, tmp_path / "mail", clone / "runs" / "paper.log"


def start(shell: str, command: str, cwd: Path, home: Path, mail: Path) -> subprocess.Popen:
    """``command`` as cron runs it (the shell's output is what cron would mail)."""
    return subprocess.Popen([shell, "-c", command], cwd=cwd, env=cron_env(home), start_new_session=True,
                            stdout=mail.open("ab"), stderr=subprocess.STDOUT)


def wait_for(log: Path, text: str, count: int = 1, proc: subprocess.Popen | None = None) -> str:
    """The log once ``text`` is in it ``count`` times."""
    deadline = time.monotonic() + DEADLINE
    while time.monotonic() < deadline:
        content = log.read_text(errors="replace") if log.exists() else ""
        if content.count(text) >= count:
            return content
        if proc is not None and proc.poll() is not None:
            pytest.fail(f"the command ended ({proc.returncode}) before {text!r} x{count} in {log}:\n{content[-3000:]}")
        time.sleep(0.2)
    pytest.fail(f"no {text!r} x{count} in {log} after {DEADLINE} s:\n"
                f"{log.read_text(errors='replace')[-3000:] if log.exists() else '(no log)'}")


def training_process(shell_pid: int) -> int:
    """The alexnet-train process under ``shell_pid`` (the shell itself if it exec'd it): the
    topmost one, not its loader workers."""
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        queue = [shell_pid]
        while queue:
            pid = queue.pop(0)
            try:
                cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
                children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
            except OSError:
                continue
            if b"alexnet-train" in cmdline and b"-c" not in cmdline.split(b"\0")[:2]:
                return pid
            queue += [int(c) for c in children]
        time.sleep(0.1)
    pytest.fail(f"no alexnet-train process under {shell_pid}")


def end(proc: subprocess.Popen, timeout: float = DEADLINE) -> int:
    try:
        return proc.wait(timeout=timeout)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def test_the_crontab_line_runs_as_printed_from_a_fresh_clone(imagenet256, tmp_path):
    """Started in a clone with no runs/: it makes runs/paper.log and trains; started again while
    it runs, it exits 75 at once; stopped, it saves (143); started again, it resumes."""
    clone, home, mail, log = cron_job(tmp_path)
    command = pasted(crontab_command(readme_crontab_line()), clone, imagenet256)
    sh = shutil.which("sh", path="/usr/bin:/bin")

    first = start(sh, command, tmp_path, home, mail)
    try:
        wait_for(log, "data.workers:", proc=first)  # the paper's model is built and stepping
        second = start(sh, command, tmp_path, home, mail)  # cron's next tick, the run still alive
        assert end(second, 120) == 75
        content = log.read_text()
        assert "alexnet-train: error: " in content and ".lock" in content
        os.kill(training_process(first.pid), signal.SIGTERM)
        assert end(first) == 143
    finally:
        end(first, 0) if first.poll() is None else None
    content = wait_for(log, "interrupted by SIGTERM; resumable checkpoint:")
    assert "Traceback" not in content
    saved = torch.load(clone / "runs" / "paper" / "last.pth", weights_only=True)
    assert saved["epoch"] == 0 and saved["step_in_epoch"] >= 1

    third = start(sh, command, tmp_path, home, mail)
    try:
        wait_for(log, "resuming from ", proc=third)
        wait_for(log, "data.workers:", count=2, proc=third)
        os.kill(training_process(third.pid), signal.SIGTERM)
        assert end(third) == 143
    finally:
        end(third, 0) if third.poll() is None else None
    content = log.read_text()
    assert content.count("interrupted by SIGTERM; resumable checkpoint:") == 2 and "Traceback" not in content
    assert torch.load(clone / "runs" / "paper" / "last.pth", weights_only=True)["step_in_epoch"] > \
        saved["step_in_epoch"]
    assert mail.read_bytes() == b""  # nothing for cron to mail: it is all in the log


def test_the_retry_loop_runs_as_printed_restarts_a_saved_stop_and_ends_on_a_config_error(imagenet256, tmp_path):
    """In bash, in the clone, under cron's environment: a SIGTERM (143) is restarted and resumed;
    a restart that meets a bad config (2) ends the loop instead of spinning."""
    clone, home, mail, log = cron_job(tmp_path)
    data = tmp_path / "data-link"  # the data, until the test takes it away
    data.symlink_to(imagenet256, target_is_directory=True)
    loop = pasted(retry_loop(), clone, data)
    bash = shutil.which("bash", path="/usr/bin:/bin")

    shell = start(bash, loop, clone, home, mail)
    try:
        wait_for(log, "data.workers:", proc=shell)
        os.kill(training_process(shell.pid), signal.SIGTERM)
        wait_for(log, "interrupted by SIGTERM; resumable checkpoint:", proc=shell)
        wait_for(log, "resuming from ", proc=shell)  # the loop restarted it, and it resumed
        wait_for(log, "data.workers:", count=2, proc=shell)
        os.kill(training_process(shell.pid), signal.SIGTERM)
        wait_for(log, "interrupted by SIGTERM; resumable checkpoint:", count=2, proc=shell)
        data.unlink()  # during the loop's pause: the next start finds no data (exit 2)
        assert end(shell, 120) == 0  # the loop ended by itself
    finally:
        end(shell, 0) if shell.poll() is None else None
    content = log.read_text()
    assert content.count("device: ") == 3, content[-3000:]  # three starts, no fourth after the 2
    last = content.strip().splitlines()[-1]
    assert last.startswith("alexnet-train: error: ") and str(data) in last, last
    assert "Traceback" not in content
    assert mail.read_bytes() == b""


# --------------------------------------------------------------------------- the sbatch line

SBATCH_SHAPE = ["--nodes=1", "--ntasks-per-node=8", "--gpus-per-node=8", "--cpus-per-task=8"]  # train.sbatch's


def why_no_slurm() -> str | None:
    """Why README's sbatch line cannot run here as printed (None when it can): it needs a Slurm
    cluster that takes train.sbatch's 8 tasks x 8 CPUs x 8 GPUs."""
    if shutil.which("sbatch") is None:
        return "no Slurm here (start one: LOCAL_SLURM_SHAPE=gpu8 scripts/slurm/local-cluster.sh start)"
    probe = subprocess.run(["sbatch", "--test-only", *SBATCH_SHAPE, "--wrap", "true"], capture_output=True,
                           text=True, timeout=30)
    if probe.returncode != 0:
        return (f"this Slurm cannot take 8 tasks x 8 CPUs x 8 GPUs ({probe.stderr.strip().splitlines()[-1:]}); "
                "LOCAL_SLURM_SHAPE=gpu8 scripts/slurm/local-cluster.sh start declares such a node")
    return None


def readme_sbatch_line() -> str:
    lines = [" ".join(body.replace("\\\n", " ").split()) for lang, body in code_blocks(REPO / "README.md")
             if lang == "bash" and body.startswith("sbatch scripts/slurm/train.sbatch")]
    assert len(lines) == 1, lines
    return lines[0]


def tasks_exited(out: str, code: int) -> set[int]:
    """The tasks srun reports as exited with ``code`` ("tasks 0-2,5: Exited with exit code 138")."""
    tasks: set[int] = set()
    for spec in re.findall(rf"tasks? ([\d,-]+): Exited with exit code {code}\b", out):
        for part in spec.split(","):
            first, _, last = part.partition("-")
            tasks |= set(range(int(first), int(last or first) + 1))
    return tasks


def job_state(job: str) -> str:
    shown = subprocess.run(["scontrol", "show", "job", job], capture_output=True, text=True, timeout=30).stdout
    found = re.search(r"JobState=(\w+)", shown)
    return found.group(1) if found else ""


def test_the_sbatch_line_runs_as_printed_saves_requeues_resumes_and_cancels(imagenet256, tmp_path):
    """README's sbatch line from a fresh clone under cron's environment, on a Slurm that takes its
    8 GPU tasks (on this VM, local-cluster.sh's gpu8 node: 8 CPU ranks of the paper's model).
    Slurm's warning (SIGUSR1 to the batch shell): every task saves and exits 138 and the job
    requeues itself and resumes; a plain scancel: every task saves and exits 143."""
    why = why_no_slurm()
    if why:
        pytest.skip(why)
    clone, home, _, _ = cron_job(tmp_path)
    line = pasted(readme_sbatch_line(), clone, imagenet256)
    submitted = subprocess.run(["/bin/sh", "-c", line], cwd=clone, env=cron_env(home), capture_output=True,
                               text=True, timeout=60)
    assert submitted.returncode == 0, submitted.stderr
    job = re.fullmatch(r"Submitted batch job (\d+)", submitted.stdout.strip()).group(1)
    log = clone / f"alexnet-{job}.out"  # train.sbatch's --output, in the directory it was submitted from
    try:
        wait_for(log, "data.workers:")
        subprocess.run(["scancel", "--batch", "--signal=USR1", job], check=True, timeout=30)
        wait_for(log, f"job {job}: requeueing")
        content = wait_for(log, "data.workers:", count=2)  # Slurm's requeue delay, then the same job again
        assert tasks_exited(content, 138) == set(range(8)), content[-3000:]
        assert "resuming from runs/paper/last.pth" in content
        subprocess.run(["scancel", job], check=True, timeout=30)
        deadline = time.monotonic() + DEADLINE
        while job_state(job) != "CANCELLED" and time.monotonic() < deadline:
            time.sleep(1)
        assert job_state(job) == "CANCELLED"
        content = wait_for(log, "interrupted by SIGTERM; resumable checkpoint: runs/paper/last.pth")
        deadline = time.monotonic() + 60
        while tasks_exited(log.read_text(), 143) != set(range(8)) and time.monotonic() < deadline:
            time.sleep(1)
        content = log.read_text()
        assert tasks_exited(content, 143) == set(range(8)), content[-3000:]
    finally:
        subprocess.run(["scancel", job], timeout=30)
    assert "Traceback" not in content
    state = torch.load(clone / "runs" / "paper" / "last.pth", weights_only=True)
    assert state["epoch"] in (0, 1) and state["config"]["data"]["batch_size"] == 128
