"""The launchers' shared sequence and pieces (``addons/launch.py``)."""

from __future__ import annotations

import argparse
import io
import os

import pytest

from addons import keyholder, launch
from addons.hardening import HardeningError
from addons.launch import OptionSpecs, Secret


class Holder:
    """A stand-in secret holder that records what the sequence did to it."""

    def __init__(self, error: str | None = None) -> None:
        self.error = error
        self.events: list[str] = []

    def secret(self) -> Secret:
        return Secret(self.load, self.take, self.clear, keyholder.load_from_fd)

    def load(self) -> None:
        self.events.append("load")
        if self.error:
            raise ValueError(self.error)

    def take(self) -> bytearray:
        self.events.append("take")
        return bytearray(b"k\n")

    def clear(self) -> None:
        self.events.append("clear")


def test_launch_runs_mitmdump_with_args_built_after_the_secret(monkeypatch):
    holder, ran = Holder(), []

    def args() -> list[str]:
        holder.events.append("args")
        return ["--mode", "x"]

    def run(a):
        holder.events.append("run")
        ran.append(a)
        return 7

    monkeypatch.setattr(launch, "run_mitmdump", run)
    err = io.StringIO()
    assert launch.launch(holder.secret(), args, 1, lambda: None, err) == 7
    assert ran == [["--mode", "x"]]
    assert holder.events == ["load", "args", "run", "clear"]
    assert err.getvalue() == ""


def test_launch_refuses_a_bad_secret_before_building_anything(monkeypatch):
    holder = Holder(error="API key must be provided via stdin")
    monkeypatch.setattr(launch, "run_mitmdump", lambda a: pytest.fail("must not start"))
    err = io.StringIO()
    code = launch.launch(holder.secret(), lambda: pytest.fail("no args"), 1, lambda: None, err)
    assert code == launch.EXIT_SECRET == 1
    assert err.getvalue() == "Error: API key must be provided via stdin\n"
    assert holder.events == ["load"]


def test_launch_hardens_before_reading_the_secret(monkeypatch):
    holder = Holder()

    def harden() -> None:
        raise HardeningError("cannot disable core dumps")

    err = io.StringIO()
    assert launch.launch(holder.secret(), lambda: [], 1, harden, err) == 1
    assert err.getvalue() == "Error: cannot disable core dumps\n"
    assert holder.events == []


def test_launch_hands_workers_the_taken_secret_and_zeroes_it(monkeypatch):
    from addons.workers import supervisor, worker

    holder, plans = Holder(), []

    def run(plan):
        plans.append((plan.count, plan.args, bytes(plan.secret), plan.per_worker(2)))
        plans.append(worker.loader_spec(plan.load))
        return 0

    monkeypatch.setattr(supervisor, "run", run)
    secret = holder.secret()
    secret.per_worker = lambda i: {"spool": f"s.{i}"}
    assert launch.launch(secret, lambda: ["a"], 3, lambda: None, io.StringIO()) == 0
    assert plans == [
        (3, ["a"], b"k\n", {"spool": "s.2"}),
        "addons.keyholder:load_from_fd",
    ]
    assert holder.events == ["load", "take", "clear"]


def test_a_worker_loads_its_secret_only_with_a_loader_of_the_bundle():
    """The worker knows no mode: its launcher names the loader, which must be a function of
    the ``addons`` package (``worker.loader_spec`` / ``worker.secret_loader``)."""
    from addons.gateway_mode import keypool
    from addons.workers import worker

    for load in (keyholder.load_from_fd, keypool.load_from_fd):
        assert worker.secret_loader(worker.loader_spec(load)) is load
    for bad in ("os:system", "addons.keyholder:nope", "addons.keyholder", "addons.x:y.z", ""):
        with pytest.raises(ValueError, match="not a secret loader"):
            worker.secret_loader(bad)
    with pytest.raises(ValueError):
        worker.loader_spec(lambda fd: None)


@pytest.mark.parametrize(
    ("host", "head"),
    [
        ("api.openai.com", "reverse:http://api.openai.com:443"),
        ("::1", "reverse:http://[::1]:443"),
    ],
)
def test_reverse_mode_head(host, head):
    assert launch.reverse_mode(host, 443, "s.py") == ["--mode", head, "-s", "s.py"]


@pytest.mark.parametrize("bad", ["x", "-1", "65536"])
def test_port_number_refuses(bad):
    with pytest.raises(argparse.ArgumentTypeError):
        launch.port_number(bad)


@pytest.mark.parametrize("bad", ["novalue", "=v"])
def test_set_spec_refuses(bad):
    with pytest.raises(argparse.ArgumentTypeError):
        launch.set_spec(bad)


def test_user_set_replaces_every_value_of_ours():
    options = OptionSpecs()
    options.put("a", [1, 2])
    options.put("b", True)
    options.put("c", None)
    assert options.specs(["a=9"]) == ["a=9", "b=true"]


def test_worker_count() -> None:
    assert launch.worker_count("3") == 3
    assert launch.worker_count("auto") == len(os.sched_getaffinity(0))
    for bad in ("0", "-1", "x", "1000"):
        with pytest.raises(ValueError, match="--workers"):
            launch.worker_count(bad)
