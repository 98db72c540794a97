"""The built wheel, installed as a user would (not editable), works outside the checkout.

The wheel is built from a copy of the working tree (``pip wheel --no-deps
--no-build-isolation``, so the build leaves nothing in the checkout and needs no network), then
installed with ``--no-deps`` into a fresh venv (``--without-pip``; this venv's pip installs into
it with ``--python``). The dependencies are not downloaded again: once the wheel is in, a
``.pth`` file in the fresh venv adds this project venv's site-packages *after* its own (mitmproxy
and the rest, already installed by ``run.sh``). A ``.pth`` line adds a path but runs none of the
``.pth`` files in it, so the project's editable install does not come along: ``addons`` is the
wheel's copy, which the test checks before anything else. Every command runs from a directory
outside the checkout with no ``PYTHONPATH``.
"""

from __future__ import annotations

import http.client
import json
import os
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

from tests.conftest import ROOT, TEST_KEY, wait_for
from tests.fake_upstream import FakeUpstream

pytestmark = pytest.mark.e2e

#: What the copy of the tree leaves out (built or installed things, not sources).
IGNORED = shutil.ignore_patterns(
    ".git", ".venv", "node_modules", "__pycache__", "*.egg-info", "build", "dist", "results",
    ".pytest_cache", ".mypy_cache", ".ruff_cache",
)  # fmt: skip


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    base = tmp_path_factory.mktemp("wheel")
    src = base / "src"
    shutil.copytree(ROOT, src, symlinks=True, ignore=IGNORED)
    proc = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
         "-w", str(base / "dist"), str(src)],
        capture_output=True, text=True, timeout=300, cwd=base,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    (built,) = (base / "dist").glob("*.whl")
    return built


@pytest.fixture(scope="module")
def installed(wheel: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The fresh venv's ``bin`` directory, with the wheel installed and the deps visible."""
    venv = tmp_path_factory.mktemp("venv") / "v"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    python = venv / "bin" / "python"
    proc = subprocess.run(
        [sys.executable, "-m", "pip", "--python", str(python), "install", "--no-deps",
         "--no-index", "-q", str(wheel)],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    site = subprocess.run(
        [str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        capture_output=True, text=True, check=True,
    ).stdout.strip()  # fmt: skip
    ours = {sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]}
    (Path(site) / "zz-project-deps.pth").write_text("".join(f"{p}\n" for p in sorted(ours)))
    return venv / "bin"


def clean_env(**extra: str) -> dict[str, str]:
    drop = ("PYTHONPATH", "VIRTUAL_ENV", "CODEX_PROXY_PROG", "XDG_DATA_HOME")
    return {**{k: v for k, v in os.environ.items() if k not in drop}, **extra}


def run(cmd: list[str], cwd: Path, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        cmd, cwd=cwd, env=clean_env(**env), capture_output=True, text=True, timeout=120
    )


def site_packages(installed: Path) -> Path:
    return Path(
        run([str(installed / "python"), "-c", "import addons; print(addons.__file__)"],
            installed).stdout.strip()
    ).parent.parent  # fmt: skip


def test_wheel_holds_every_package_and_default(wheel: Path) -> None:
    names = set(zipfile.ZipFile(wheel).namelist())
    packages = {p.relative_to(ROOT).as_posix() for p in (ROOT / "addons").rglob("__init__.py")}
    assert "addons/workers/__init__.py" in packages
    assert packages <= names, sorted(packages - names)
    defaults = [*sorted(p.name for p in (ROOT / "config").glob("*.yaml")), "codex-models.json"]
    assert {"codex-models.yaml", "codex-rate-card.yaml", "proxy.yaml"} <= set(defaults)
    for name in defaults:
        shipped = zipfile.ZipFile(wheel).read(f"addons/default_config/{name}")
        assert shipped == (ROOT / "config" / name).read_bytes(), name
    assert not any(n.startswith(("tests/", "bench/")) for n in names)


def test_installed_package_is_the_wheels_copy(installed: Path, tmp_path: Path) -> None:
    proc = run(
        [str(installed / "python"), "-c",
         "import addons, addons.defaults as d; print(addons.__file__); print(d.DEFAULTS_DIR)"],
        tmp_path,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    package, defaults = proc.stdout.split()
    venv = str(installed.parent)
    assert package.startswith(venv) and not package.startswith(str(ROOT))
    assert defaults.startswith(venv) and defaults.endswith("addons/default_config")


def test_console_scripts_outside_the_checkout(installed: Path, tmp_path: Path) -> None:
    helped = run([str(installed / "codex-responses-api-proxy"), "--help"], tmp_path)
    assert helped.returncode == 0, helped.stderr
    assert helped.stdout.startswith("usage: codex-responses-api-proxy")
    assert "--github-oidc" in helped.stdout

    config = run([str(installed / "codex-config"), "--port", "4321", "--toml-only"], tmp_path)
    assert config.returncode == 0, config.stderr
    assert 'base_url = "http://127.0.0.1:4321/v1"' in config.stdout

    # The gateway's default config and its Alembic migrations come from the package too.
    db = tmp_path / "gateway.db"
    init = run(
        [str(installed / "python"), "-m", "addons.gateway_mode.cli", "--database",
         f"sqlite:///{db}", "init"],
        tmp_path,
    )  # fmt: skip
    assert init.returncode == 0, init.stderr
    assert db.exists()


def test_one_command_for_every_mode(installed: Path, tmp_path: Path) -> None:
    """codex-proxy: help lists the commands, each command's help names `codex-proxy X`, an
    unknown word exits 2 with the list, `demo --help` helps (runs nothing)."""
    helped = run([str(installed / "codex-proxy"), "help"], tmp_path)
    assert helped.returncode == 0, helped.stderr
    assert helped.stdout.startswith("usage: codex-proxy [COMMAND] [ARGS...]")
    for name in ("gateway", "web", "record", "replay", "compare", "demo", "standin",
                 "codex-config"):  # fmt: skip
        assert f"\n  {name}" in helped.stdout, name
        own = run([str(installed / "codex-proxy"), name, "--help"], tmp_path)
        assert own.returncode == 0, own.stderr
        assert own.stdout.startswith(f"usage: codex-proxy {name} "), own.stdout[:200]
    assert "Demo finished" not in own.stdout
    unknown = run([str(installed / "codex-proxy"), "foo"], tmp_path)
    assert unknown.returncode == 2 and "unknown command 'foo'" in unknown.stderr
    assert "\n  gateway" in unknown.stderr
    proxy = run([str(installed / "codex-proxy"), "--help"], tmp_path)
    assert proxy.stdout.startswith("usage: codex-proxy [-h] [--port PORT]")
    assert proxy.stdout.rstrip().endswith("codex-proxy help")


def test_gateway_database_defaults_outside_the_package(installed: Path, tmp_path: Path) -> None:
    """`codex-proxy gateway init` with the shipped config: $XDG_DATA_HOME/codex-proxy/gateway.db
    (else ~/.local/share/codex-proxy), never inside site-packages; messages name the path."""
    home, xdg = tmp_path / "home", tmp_path / "xdg"
    gateway = [str(installed / "codex-proxy"), "gateway"]
    missing = run([*gateway, "list-members"], tmp_path, HOME=str(home))
    fallback = home / ".local" / "share" / "codex-proxy" / "gateway.db"
    assert missing.returncode == 2
    assert missing.stderr == (
        f"codex-proxy gateway: error: no database at {fallback}: "
        "run `codex-proxy gateway init` first\n"
    )
    for env, db in (
        ({"HOME": str(home)}, fallback),
        ({"HOME": str(home), "XDG_DATA_HOME": str(xdg)}, xdg / "codex-proxy" / "gateway.db"),
    ):
        init = run([*gateway, "init"], tmp_path, **env)
        assert init.returncode == 0, init.stderr
        assert init.stdout.startswith("database ready (schema ") and init.stdout.endswith(
            f"): {db}\n"
        )
        assert db.exists()
        listed = run([*gateway, "list-members"], tmp_path, **env)
        assert listed.returncode == 0, listed.stderr
    assert not list(site_packages(installed).rglob("gateway.db"))


def test_the_stand_in_alone(installed: Path, tmp_path: Path) -> None:
    """`codex-proxy standin`: listens, says where, answers a Responses stream, stops on SIGTERM."""
    info = tmp_path / "standin.json"
    proc = subprocess.Popen(
        [str(installed / "codex-proxy"), "standin", "--server-info", str(info)],
        stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        cwd=tmp_path, env=clean_env(),
    )  # fmt: skip
    try:
        wait_for(lambda: info.exists() or proc.poll() is not None, 60, "the stand-in")
        assert proc.poll() is None, proc.communicate()
        where = json.loads(info.read_text())
        assert where["url"] == f"http://127.0.0.1:{where['port']}/v1/responses"
        conn = http.client.HTTPConnection("127.0.0.1", where["port"], timeout=30)
        conn.request("POST", "/v1/responses", json.dumps({"model": "m", "stream": True}),
                     {"content-type": "application/json"})  # fmt: skip
        resp = conn.getresponse()
        assert resp.status == 200 and b"response.completed" in resp.read()
        conn.close()
    finally:
        proc.terminate()
        out, err = proc.communicate(timeout=30)
    assert proc.returncode == 0, err
    assert out.splitlines()[0] == f"Responses stand-in listening at {where['url']}"
    assert f"codex-proxy --upstream-url {where['url']}" in out


@pytest.mark.parametrize(
    "command",
    [["codex-responses-api-proxy", "--record"], ["codex-proxy", "record"]],
    ids=["drop-in", "codex-proxy record"],
)
def test_request_through_the_installed_proxy(
    installed: Path, tmp_path: Path, command: list[str]
) -> None:
    """Key on stdin, a recording priced with the shipped rate card, one request, shutdown."""
    info, record = tmp_path / "info.json", tmp_path / "record"
    with FakeUpstream() as up, open(tmp_path / "err.log", "wb") as err:
        proc = subprocess.Popen(
            [str(installed / command[0]), *command[1:], str(record), "--server-info", str(info),
             "--upstream-url", up.url, "--http-shutdown"],
            stdin=subprocess.PIPE, stdout=err, stderr=err, cwd=tmp_path, env=clean_env(),
        )  # fmt: skip
        try:
            assert proc.stdin is not None
            proc.stdin.write(TEST_KEY.encode() + b"\n")
            proc.stdin.close()
            wait_for(lambda: info.exists() or proc.poll() is not None, 60, "server-info")
            assert proc.poll() is None, (tmp_path / "err.log").read_text()
            port = json.loads(info.read_text())["port"]
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
            body = json.dumps({"model": "gpt-5.5", "stream": True, "input": "hi"})
            conn.request("POST", "/v1/responses", body, {"content-type": "application/json"})
            resp = conn.getresponse()
            data = resp.read()
            conn.close()
            assert resp.status == 200
            assert b"response.completed" in data
            (seen,) = up.requests
            assert seen.header_values("authorization") == [f"Bearer {TEST_KEY}"]
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
            conn.request("GET", "/shutdown")
            assert conn.getresponse().status == 200
            conn.close()
            assert proc.wait(30) == 0
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait(10)
    summary = json.loads((record / "summary.json").read_text())
    assert summary["totals"]["requests"] == 1
    assert summary["totals"]["credits"] not in (None, "0")  # priced: the rate card was found


def test_demo_runs_from_the_installed_package(installed: Path, tmp_path: Path) -> None:
    """The demo's stand-in is product code: the wheel has no tests/, and the demo still runs."""
    demo = run([str(installed / "codex-proxy"), "demo"], tmp_path)
    assert demo.returncode == 0, demo.stdout + demo.stderr
    assert "Local Responses stand-in listening" in demo.stdout
