"""The evidence runner (experiments/protocols/jobs.py): parts side by side over one pool of cores.

``run_all`` is driven with a stand-in for its process start whose processes "run" for a fixed time and write
their result, so the test counts, independently of the pool's own bookkeeping, how many ran at once; one test
starts real processes.
"""

import json
import threading
import time
from pathlib import Path

import pytest
import torch

from experiments.protocols import jobs


class FakeRuns:
    """Processes that finish ``seconds`` after they start, writing ``{"name": ...}``; the peak running at once."""

    def __init__(self, seconds: float):
        self.seconds, self.running, self.peak, self.started = seconds, 0, 0, []
        self.lock = threading.Lock()

    def start(self, part, kwargs, target, log):
        runs = self

        class Process:
            def __init__(self):
                self.start = time.monotonic()
                with runs.lock:
                    runs.running += 1
                    runs.peak = max(runs.peak, runs.running)
                    runs.started.append(target.stem)

            def poll(self):
                if time.monotonic() - self.start < runs.seconds:
                    return None
                if not target.is_file():
                    target.write_text(json.dumps({"name": target.stem}))
                    with runs.lock:
                        runs.running -= 1
                return 0

        return Process()


@pytest.fixture
def fake_runs(monkeypatch):
    runs = FakeRuns(seconds=0.6)
    monkeypatch.setattr(jobs, "_start", runs.start)
    monkeypatch.setattr(jobs, "_pool", None)
    threads = torch.get_num_threads()
    yield runs
    torch.set_num_threads(threads)


def run_parts_side_by_side(tmp_path, parts: dict[str, int], jobs_each: int) -> dict[str, list[dict]]:
    results, errors = {}, []

    def part(name, count):
        try:
            runs = [(f"{name}{i}", {}) for i in range(count)]
            results[name] = jobs.run_all(name, runs, tmp_path / name, jobs_each)
        except Exception as error:  # surfaced below, in the test's thread
            errors.append(error)

    threads = [threading.Thread(target=part, args=item) for item in parts.items()]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert not errors and not any(t.is_alive() for t in threads)
    return results


def test_parts_side_by_side_never_run_more_than_the_shared_cores(tmp_path, fake_runs):
    jobs.share_cores(2)
    results = run_parts_side_by_side(tmp_path, {"a": 4, "b": 3, "c": 2}, jobs_each=2)
    assert fake_runs.peak == 2  # each part alone would allow 2, three of them 6
    assert {name: [r["name"] for r in rows] for name, rows in results.items()} == {
        "a": ["a0", "a1", "a2", "a3"], "b": ["b0", "b1", "b2"], "c": ["c0", "c1"]}
    assert jobs._pool.free == 2  # every core handed back


def test_without_a_shared_pool_each_part_has_its_own_jobs(tmp_path, fake_runs):
    run_parts_side_by_side(tmp_path, {"a": 2, "b": 2}, jobs_each=2)
    assert fake_runs.peak == 4


def test_cores_go_to_the_parts_in_turn(tmp_path, fake_runs):
    """A part with many runs must not keep the cores: the two parts' first runs start before 'a' starts its third."""
    jobs.share_cores(1)
    run_parts_side_by_side(tmp_path, {"a": 4, "b": 2}, jobs_each=2)
    assert fake_runs.started.index("b1") < fake_runs.started.index("a3")


def test_an_in_process_step_holds_a_core(tmp_path, fake_runs):
    jobs.share_cores(1)
    with jobs.in_process_step():
        assert jobs._pool.free == 0
        assert not jobs._take_core()  # a run waits for the step
    assert jobs._pool.free == 1 and torch.get_num_threads() == 1


def test_runs_are_processes_of_their_own_with_their_log_and_result(tmp_path, monkeypatch):
    """Real runs, each a new interpreter: the part's ``run_one`` result lands in JSON, a failure names its log."""
    monkeypatch.setattr(jobs, "_pool", None)
    runs = [("ok", dict(rows=[[1, 0, 2], [3, 4, 0]], name="left"))]
    result = jobs.run_all("testing", runs, tmp_path, jobs=2)
    assert result == [dict(name="left", lengths=[2, 2], threads=1, cwd=str(Path(jobs.__file__).parents[2]))]
    assert "testing run left" in (tmp_path / "ok.log").read_text()
    with pytest.raises(RuntimeError, match="bad"):
        jobs.run_all("testing", [("bad", dict(rows=[[1]], name="bad", fail=True))], tmp_path, jobs=1)
    assert "ValueError: asked to fail" in (tmp_path / "bad.log").read_text()
