"""The load watch of the benchmark suite: /proc parsing, the contended verdict, its marking in results and the
summary, and ``--require-quiet``'s bounded wait (with a fake machine: the real one is shared and never quiet)."""

from __future__ import annotations

import os
import time

import pytest

from benchmarks import common
from benchmarks.common import Config, claim, configure_load, make_result, time_side_by_side
from benchmarks.load import (
    TOLERANCE_CORES,
    CpuReading,
    LoadMeter,
    LoadWindow,
    MachineBusy,
    descendants_seconds,
    parse_busy_seconds,
    parse_own_seconds,
    read_cpu,
)

STAT = "cpu  100 5 50 1000 20 3 2 10 0 0\ncpu0 50 2 25 500 10 1 1 5 0 0\nintr 1 2 3\n"
SELF_STAT = "4242 (python -m x) R 1 2 3 4 5 6 7 8 9 10 300 200 40 60 20 0 1 0 100\n"


class FakeMachine:
    """A machine whose other processes keep ``others`` cores busy; every reading advances the clock by
    ``step`` seconds (as if that much work ran between readings), ``sleep`` advances it by the time slept."""

    def __init__(self, others: float, step: float = 1.0, loadavg: float = 0.5):
        self.others, self.step, self.loadavg = others, step, loadavg
        self.t, self.busy, self.own = 100.0, 1000.0, 10.0

    def _advance(self, seconds: float) -> None:
        self.t += seconds
        self.busy += self.others * seconds

    def read(self) -> CpuReading:
        self._advance(self.step)
        return CpuReading(self.t, (self.loadavg, self.loadavg, self.loadavg), self.busy, self.own)

    def sleep(self, seconds: float) -> None:
        self._advance(seconds)


@pytest.fixture
def fake_load():
    """Point the timing helpers at a fake machine; restore the real policy afterwards."""
    saved = common.LOAD

    def use(machine: FakeMachine, threads: int = 2, cores: int = 2, require_quiet: bool = False,
            timeout: float = 5.0):
        cfg = Config(threads=threads, require_quiet=require_quiet, quiet_timeout_s=timeout)
        return configure_load(cfg, LoadMeter(threads, cores, read=machine.read, sleep=machine.sleep))

    yield use
    common.LOAD = saved


def test_proc_parsing():
    # busy = all fields of the first 8 but idle (1000) and iowait (20): 100+5+50+3+2+10 = 170 ticks
    assert parse_busy_seconds(STAT, 100) == pytest.approx(1.70)
    # utime stime cutime cstime = 300 200 40 60, despite the space inside the command name
    assert parse_own_seconds(SELF_STAT, 100) == pytest.approx(6.0)
    with pytest.raises(ValueError):
        parse_busy_seconds("cpu0 1 2 3 4 5 6 7 8\n", 100)


def test_read_cpu_from_a_fake_proc(tmp_path):
    (tmp_path / "self").mkdir()
    (tmp_path / "loadavg").write_text("3.50 2.00 1.00 4/300 999\n")
    (tmp_path / "stat").write_text(STAT)
    (tmp_path / "self" / "stat").write_text(SELF_STAT)
    r = read_cpu(tmp_path)
    assert r.loadavg == (3.5, 2.0, 1.0)
    assert r.busy_s is not None and r.own_s is not None and r.busy_s > 0 and r.own_s > 0
    (tmp_path / "stat").unlink()  # no /proc/stat: the load average stands in
    assert read_cpu(tmp_path).busy_s is None


def test_live_children_count_as_own_cpu_time(tmp_path):
    """A child the benchmark started (the serve benchmark's server) is the measurement's work, not another
    process's: its CPU time and its own children's count as ours; an unrelated process's does not."""
    (tmp_path / "self").mkdir()
    (tmp_path / "loadavg").write_text("1.0 1.0 1.0 1/1 1\n")
    (tmp_path / "stat").write_text(STAT)
    (tmp_path / "self" / "stat").write_text(SELF_STAT)
    me = os.getpid()
    for pid, ppid, ticks in ((9001, me, 150), (9002, 9001, 50), (9003, 1, 700)):
        (tmp_path / str(pid)).mkdir()
        (tmp_path / str(pid) / "stat").write_text(f"{pid} (serve x) S {ppid} 2 3 4 5 6 7 8 9 10 {ticks} 0 0 0 20\n")
    # own: 6.0 s of /proc/self plus 1.5 + 0.5 s of the two descendants; process 9003 is someone else's
    assert read_cpu(tmp_path).own_s == pytest.approx(8.0)
    assert descendants_seconds(tmp_path, 9001, 100) == pytest.approx(0.5)


def _window(others_cpu_s: float, own_cpu_s: float, wall: float = 10.0, threads: int = 2, cores: int = 2,
            loadavg: float = 0.5) -> LoadWindow:
    la = (loadavg,) * 3
    before = CpuReading(0.0, la, 1000.0, 50.0)
    after = CpuReading(wall, la, 1000.0 + others_cpu_s + own_cpu_s, 50.0 + own_cpu_s)
    return LoadWindow(before, after, threads, cores)


def test_contended_verdict_from_other_processes_cpu_time():
    quiet = _window(others_cpu_s=0.5, own_cpu_s=19.0)  # others: 0.05 cores over 10 s
    assert quiet.other_cores == pytest.approx(0.05) and not quiet.contended
    busy = _window(others_cpu_s=10.0, own_cpu_s=10.0)  # one other busy thread
    assert busy.other_cores == pytest.approx(1.0) and busy.contended
    assert busy.load == pytest.approx(3.0)
    record = busy.to_json()
    assert record["contended"] is True and "CONTENDED" in busy.describe()
    assert record["all_cores_busy_s"] == [1000.0, 1020.0] and record["own_cpu_s"] == [50.0, 60.0]
    # one thread on two cores leaves room for another process's thread
    assert not _window(others_cpu_s=10.0, own_cpu_s=10.0, threads=1).contended
    # our own CPU time never counts against us, however busy we were
    assert not _window(others_cpu_s=0.0, own_cpu_s=20.0).contended
    # just above the tolerance is contended
    assert _window(others_cpu_s=(TOLERANCE_CORES + 0.05) * 10, own_cpu_s=0.0).contended


def test_without_proc_stat_the_load_average_decides():
    la = lambda v: (v, v, v)  # noqa: E731
    w = LoadWindow(CpuReading(0, la(1.0), None, None), CpuReading(5, la(4.0), None, None), 2, 2)
    assert w.other_cores is None and w.contended
    w = LoadWindow(CpuReading(0, la(1.0), None, None), CpuReading(5, la(1.5), None, None), 2, 2)
    assert not w.contended


def test_side_by_side_rows_marked_contended_and_no_claim(fake_load):
    fake_load(FakeMachine(others=1.2))
    t = time_side_by_side({"a": lambda: None, "b": lambda: None}, warmup=0, repeats=2)
    assert t["a"].contended and t["a"].load is t["b"].load
    rows = [{"x": "1", "met": True, "data": {"a": t["a"].to_json(), "nested": [{"b": t["b"].to_json()}]}}]
    res = make_result("demo", "demo", "target", ["x"], rows)
    assert res["contended"] is True and res["rows"][0]["contended"] is True
    assert "load" in res["columns"] and res["rows"][0]["load"].startswith("CONTENDED")
    assert res["met"] is True and claim(res) == "contended"  # a met target on a busy machine claims nothing


def test_quiet_rows_claim_their_verdict(fake_load):
    fake_load(FakeMachine(others=0.02))
    t = time_side_by_side({"a": lambda: None}, warmup=0, repeats=1)
    res = make_result("demo", "demo", "target", ["x"], [{"x": 1, "met": False, "data": {"a": t["a"].to_json()}}])
    assert res["contended"] is False and res["rows"][0]["load"].startswith("quiet")
    assert claim(res) == "missed"


def test_require_quiet_repeats_contended_rounds_then_fails(fake_load):
    machine = FakeMachine(others=0.0)
    calls = []

    def block():  # the machine turns busy while the rounds run
        calls.append(1)
        machine.others = 1.5

    def settle(seconds):  # and quiet again while we wait for it
        machine.others = 0.0
        machine._advance(seconds)

    policy = fake_load(machine, require_quiet=True)
    policy.meter.sleep = settle
    with pytest.raises(MachineBusy, match="contended"):
        common.under_load_watch(block)
    assert len(calls) == 1 + policy.retries


def test_require_quiet_waits_for_a_quiet_probe(fake_load):
    machine = FakeMachine(others=2.0, step=0.0)
    probes = []

    def sleep(seconds):
        probes.append(seconds)
        machine._advance(seconds)
        if len(probes) == 2:
            machine.others = 0.0  # the other job ends during the second probe's ... next probe is quiet

    meter = LoadMeter(2, 2, read=machine.read, sleep=sleep)
    w = meter.wait_quiet(timeout_s=30, probe_s=3)
    assert not w.contended and len(probes) == 3


def test_require_quiet_times_out_bounded(monkeypatch):
    machine = FakeMachine(others=1.0, step=0.0)
    meter = LoadMeter(2, 2, read=machine.read, sleep=machine.sleep)
    with pytest.raises(MachineBusy, match="stayed busy for 10 s"):
        meter.wait_quiet(timeout_s=10, probe_s=3)
    assert machine.t - 100.0 <= 10.0  # never waited past the bound (fake seconds)


def test_main_require_quiet_fails_fast_on_a_busy_machine(monkeypatch, tmp_path):
    """The real entry point: a busy machine (fake /proc readings) and a 1 s bound -> exit code 3 within seconds,
    before anything is built."""
    from benchmarks import __main__ as bench_main
    from benchmarks import load

    machine = FakeMachine(others=1.8, step=0.0)
    monkeypatch.setattr(load, "read_cpu", lambda proc=None: machine.read())
    monkeypatch.setattr(load, "_sleep", machine.sleep)
    saved = common.LOAD
    try:
        t0 = time.perf_counter()
        code = bench_main.main(["--tiny", "--require-quiet", "--quiet-timeout", "1", "--only", "params",
                                "--out", str(tmp_path / "out"), "--cache", str(tmp_path / "cache")])
        assert code == bench_main.EXIT_BUSY
        assert time.perf_counter() - t0 < 5
        assert not (tmp_path / "out").exists()  # failed before measuring anything
    finally:
        common.LOAD = saved
