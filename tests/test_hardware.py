"""`moelab.hardware`: the CPUs a process may use (affinity, cgroup quota) and the load."""

from __future__ import annotations

import os
import subprocess
import sys

from moelab import hardware


def _fake_cgroup(monkeypatch, tmp_path, files: dict[str, str], cgroups: list[tuple[str, str]]):
    for rel, text in files.items():
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_text(text)
    monkeypatch.setattr(hardware, "_CGROUP_ROOT", tmp_path)
    monkeypatch.setattr(hardware, "_cgroup_paths", lambda: cgroups)


def test_cgroup_v2_quota(monkeypatch, tmp_path):
    _fake_cgroup(monkeypatch, tmp_path, {"job/cpu.max": "150000 100000\n"}, [("", "/job")])
    assert hardware.cpu_quota() == 1.5
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1, 2, 3})
    assert hardware.available_cpus() == 2  # 1.5 CPUs of quota: two threads may run at once


def test_cgroup_v2_no_quota(monkeypatch, tmp_path):
    _fake_cgroup(monkeypatch, tmp_path, {"cpu.max": "max 100000\n"}, [("", "/")])
    assert hardware.cpu_quota() is None


def test_cgroup_v1_quota(monkeypatch, tmp_path):
    _fake_cgroup(monkeypatch, tmp_path, {"cpu,cpuacct/cpu.cfs_quota_us": "100000\n",
                                         "cpu,cpuacct/cpu.cfs_period_us": "100000\n"},
                 [("cpu,cpuacct", "/")])
    assert hardware.cpu_quota() == 1.0
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1, 2, 3, 4, 5, 6, 7})
    assert hardware.available_cpus() == 1


def test_affinity_caps_the_count(monkeypatch, tmp_path):
    _fake_cgroup(monkeypatch, tmp_path, {}, [])
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {3})
    monkeypatch.setattr(os, "cpu_count", lambda: 64)
    assert hardware.available_cpus() == 1


def test_load_average_is_a_number_here():
    load = hardware.load_average()
    assert load is None or load >= 0


def test_the_cli_asks_openmp_for_passive_waiting_before_torch_loads():
    code = "import os, sys, moelab.cli.main; print(os.environ['OMP_WAIT_POLICY'], 'torch' in sys.modules)"
    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True).stdout
    assert out.split() == ["PASSIVE", "False"]
    out = subprocess.run([sys.executable, "-c", code], env={**env, "OMP_WAIT_POLICY": "active"}, capture_output=True,
                         text=True, check=True).stdout
    assert out.split()[0] == "active"  # an explicit setting wins
