"""``./run.sh compare BASE NEW``: recordings made by the real proxy (and the gateway) against the
local stand-in, compared in every output format; unreadable recordings; turn alignment."""

from __future__ import annotations

import html
import http.client
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from addons import compare
from addons.recorder import SUMMARY_FORMAT_VERSION, RequestRecord
from tests.conftest import ROOT, START_TIMEOUT, TEST_KEY, ProxyProcess, launcher_cmd, wait_for
from tests.fake_upstream import FakeUpstream, responses_sse_events
from tests.responses_events import ending, tool_call_events

MODEL = "gpt-5.3-codex"  # on the shipped rate card: recordings are priced in credits
USER = {"type": "message", "role": "user", "content": "fix the failing test"}
TOOLS = [{"type": "function", "name": "shell"}, {"type": "function", "name": "apply_patch"}]


def call_items(n: int) -> list[dict[str, Any]]:
    """``n`` earlier tool round trips, as Codex sends them back in the next turn's input."""
    out: list[dict[str, Any]] = []
    for i in range(n):
        out.append(
            {"type": "function_call", "name": "shell", "arguments": "{}", "call_id": f"c{i}"}
        )
        out.append({"type": "function_call_output", "call_id": f"c{i}", "output": "ok"})
    return out


def body(rounds: int) -> dict[str, Any]:
    return {"model": MODEL, "stream": True, "tools": TOOLS, "input": [USER, *call_items(rounds)]}


def with_usage(events: list, **usage: int) -> list:
    """``events`` whose terminal response carries this usage (input, cached, output)."""
    kind, payload = events[-1]
    response = dict(payload["response"])
    inp, cached, out = usage.get("input", 100), usage.get("cached", 60), usage.get("output", 17)
    response["usage"] = {
        "input_tokens": inp,
        "input_tokens_details": {"cached_tokens": cached},
        "output_tokens": out,
        "output_tokens_details": {"reasoning_tokens": 5},
        "total_tokens": inp + out,
    }
    return [*events[:-1], (kind, {**payload, "response": response})]


def shell_call(**usage: int) -> list:
    return with_usage(tool_call_events([("shell", {"command": ["pytest"]})], model=MODEL), **usage)


def text(**usage: int) -> list:
    return with_usage(responses_sse_events("Fixed it.", MODEL), **usage)


#: A step: ("post", request body, events, fault or upstream status), ("refuse",): GET /v1/models
#: (403), or ("websocket",): a WebSocket upgrade (426).
Step = tuple[Any, ...]
BASE: list[Step] = [("post", body(0), shell_call(), None), ("post", body(1), text(), None)]
SCENARIOS: dict[str, list[Step]] = {
    "base": BASE,
    "same": BASE,
    "tokens": [BASE[0], ("post", body(1), text(output=60), None)],
    "cache": [BASE[0], ("post", body(1), text(cached=0), None)],
    "tools": [
        (
            "post",
            body(0),
            with_usage(
                tool_call_events(
                    [("shell", {"command": ["pytest"], "workdir": "/w"}), ("apply_patch", {})],
                    model=MODEL,
                )
            ),
            None,
        ),
        BASE[1],
    ],
    "refusal": [*BASE, ("refuse",), ("websocket",)],
    "failed": [
        BASE[0],
        ("post", body(1), ending(text(), "response.failed", error={"code": "server_error"}), None),
    ],
    "cut": [BASE[0], ("post", body(1), text(), "truncate")],
    "http_error": [BASE[0], ("post", body(1), None, 500)],
    "added": [BASE[0], ("post", body(1), shell_call(), None), ("post", body(2), text(), None)],
}


def start_recording_proxy(directory: Path, upstream_url: str, *args: str) -> ProxyProcess:
    """The real proxy (``python -m addons.cli``) recording into ``directory``."""
    info, out, err = (directory.parent / f"{directory.name}.{x}" for x in ("info", "out", "err"))
    with open(out, "wb") as fo, open(err, "wb") as fe:
        proc = subprocess.Popen(
            [
                *launcher_cmd(),
                *("--server-info", str(info), "--http-shutdown"),
                *("--upstream-url", upstream_url, "--record", str(directory), *args),
            ],
            stdin=subprocess.PIPE,
            stdout=fo,
            stderr=fe,
            cwd=ROOT,
        )
    assert proc.stdin is not None
    proc.stdin.write(TEST_KEY.encode() + b"\n")
    proc.stdin.close()
    handle = ProxyProcess(proc, 0, info, out, err, None, True)
    wait_for(lambda: info.exists() or proc.poll() is not None, START_TIMEOUT, "server-info")
    assert proc.poll() is None, handle.output()
    handle.port = json.loads(info.read_text())["port"]
    return handle


def play(proxy: ProxyProcess, upstream: FakeUpstream | None, steps: list[Step]) -> None:
    for step in steps:
        if step[0] == "refuse":
            assert proxy.request("GET", "/v1/models")[0] == 403
            continue
        if step[0] == "websocket":  # Codex with supports_websockets = true
            upgrade = {"Upgrade": "websocket", "Connection": "Upgrade"}
            assert proxy.request("GET", "/v1/responses", headers=upgrade)[0] == 426
            continue
        _, payload, events, fault = step
        if upstream is not None:
            upstream.events, upstream.fault_after = events, 3
            upstream.status = fault if isinstance(fault, int) else 200
            upstream.fault = fault if isinstance(fault, str) else None
        try:
            proxy.post_json(payload)
        except (OSError, http.client.HTTPException):  # a cut stream: an incomplete body
            assert fault == "truncate"


@pytest.fixture(scope="module")
def recordings(tmp_path_factory) -> dict[str, Path]:
    """One recording per scenario, each made by the real proxy against the stand-in."""
    root = tmp_path_factory.mktemp("recordings")
    out = {}
    with FakeUpstream() as upstream:
        for name, steps in SCENARIOS.items():
            proxy = start_recording_proxy(root / name, upstream.url)
            try:
                play(proxy, upstream, steps)
                assert proxy.shutdown() == 0, proxy.output()
            finally:
                proxy.stop()
            out[name] = root / name
    return out


def run_compare(base: Path, new: Path, tmp_path: Path, *args: str) -> tuple[int, dict[str, str]]:
    """``compare.main`` with every output: returns the exit code and each format's text."""
    md, js, page = tmp_path / "summary.md", tmp_path / "compare.json", tmp_path / "compare.html"
    for p in (md, js, page):
        p.unlink(missing_ok=True)
    stdout = tmp_path / "stdout.txt"
    real = sys.stdout
    with open(stdout, "w") as sys.stdout:  # type: ignore[assignment]
        try:
            code = compare.main(
                [
                    *(str(base), str(new), "--markdown", str(md), "--json", str(js)),
                    *("--html", str(page), *args),
                ]
            )
        finally:
            sys.stdout = real
    texts = {
        "text": stdout.read_text(),
        "markdown": md.read_text(),
        "json": js.read_text(),
        "html": page.read_text(),
    }
    return code, texts


def test_recording_carries_its_format_version(recordings):
    summary = json.loads((recordings["base"] / "summary.json").read_text())
    assert summary["format_version"] == SUMMARY_FORMAT_VERSION == 1


@pytest.mark.parametrize("new", ["base", "same"])
def test_self_compare_passes(recordings, tmp_path, new):
    code, texts = run_compare(recordings["base"], recordings[new], tmp_path)
    assert code == 0, texts["text"]
    assert texts["text"].startswith("PASS")
    result = json.loads(texts["json"])
    assert result["exit_code"] == 0 and not any(f["regression"] for f in result["figures"])
    changed = [f["name"] for f in result["figures"] if f["changed"] and not f["timing"]]
    assert changed == []
    assert {f["name"] for f in result["figures"]} >= {
        "tokens input",
        "tokens cached",
        "tokens output",
        "tokens reasoning",
        "tokens total",
        "credits",
        "USD",
        "cache hit ratio %",
        "requests",
        "turns completed",
        "HTTP 200",
        "tool shell calls",
        "first event p95 ms",
        "duration p50 ms",
    }
    assert [(t["base"], t["new"], t["note"]) for t in result["turns"]] == [(1, 1, ""), (2, 2, "")]


#: scenario: (the figure named, its change, thresholds under which it is the regression,
#: thresholds under which it passes). ``[]``: config/compare.yaml as shipped.
DIFFERENCES = {
    "tokens": ("tokens output", "+126.5%", [], ["tokens_pct=200", "credits_pct=200"]),
    "cache": ("cache hit ratio %", "-30.0 pt", [], ["cache_hit_drop_points=30"]),
    "tools": ("tool apply_patch calls", "new tool", [], ["new_tool=false"]),
    "refusal": (
        "refusals not-allowlisted (403)",
        "new kind",
        [],
        ["new_refusal_kind=false", "requests_pct=100"],
    ),
    "failed": ("turns failed", "+1", [], ["failed_turns=1"]),
    "cut": ("turns cut", "+1", [], ["failed_turns=1", "tokens_pct=null", "credits_pct=null"]),
    "http_error": (
        "HTTP 500",
        "new status",
        ["failed_turns=1"],
        ["failed_turns=1", "new_error_status=false"],
    ),
    # An added turn costs tokens (gated as such); turns_added gates the turn itself.
    "added": (
        "turns added",
        "+1",
        ["turns_added=0", "tokens_pct=100", "credits_pct=100"],
        ["tokens_pct=100", "credits_pct=100"],
    ),
}


def sets(specs: list[str]) -> list[str]:
    return [x for spec in specs for x in ("--set", spec)]


@pytest.mark.parametrize("scenario", DIFFERENCES)
def test_each_difference_is_named_and_gated_by_its_threshold(recordings, tmp_path, scenario):
    name, change, fail, relax = DIFFERENCES[scenario]
    code, texts = run_compare(recordings["base"], recordings[scenario], tmp_path, *sets(fail))
    assert code == 1, texts["text"]
    assert texts["text"].startswith("REGRESSION") and name in texts["text"].splitlines()[0]
    figure = next(f for f in json.loads(texts["json"])["figures"] if f["name"] == name)
    assert figure["regression"] and figure["change"] == change, figure
    assert f"| {name} |" in texts["markdown"] and "REGRESSION" in texts["markdown"]
    assert f"<td class=l>{html.escape(name)}</td>" in texts["html"]
    assert re.search(rf"{re.escape(name)}\s+\S.*REGRESSION", texts["text"])
    # Within a threshold set for it: still named, no longer a regression.
    code, texts = run_compare(recordings["base"], recordings[scenario], tmp_path, *sets(relax))
    assert code == 0, texts["text"]
    figure = next(f for f in json.loads(texts["json"])["figures"] if f["name"] == name)
    assert figure["changed"] and not figure["regression"]
    for fmt in ("text", "markdown", "html"):
        assert name in texts[fmt], fmt
    if scenario == "refusal":  # both new kinds, each named
        figures = {f["name"]: f for f in json.loads(texts["json"])["figures"]}
        assert figures["refusals websocket (426)"]["change"] == "new kind"


def test_tool_argument_keys_are_reported_and_gated_only_when_asked(recordings, tmp_path):
    relaxed = ["--set", "new_tool=false"]
    code, texts = run_compare(recordings["base"], recordings["tools"], tmp_path, *relaxed)
    figure = next(
        f for f in json.loads(texts["json"])["figures"] if f["name"] == "tool shell argument keys"
    )
    assert code == 0 and figure["change"] == "+workdir" and not figure["regression"]
    assert (figure["base"], figure["new"]) == ("command", "command,workdir")
    code, _ = run_compare(
        recordings["base"],
        recordings["tools"],
        tmp_path,
        *relaxed,
        "--set",
        "tool_arguments_changed=true",
    )
    assert code == 1


def test_turn_table_names_the_added_turn_and_the_failed_one(recordings, tmp_path):
    _, texts = run_compare(recordings["base"], recordings["added"], tmp_path)
    turns = json.loads(texts["json"])["turns"]
    # NEW's turn 2 sent BASE's turn 2's request (same shape) and got a tool call back; its
    # turn 3 is the one added.
    assert [(t["base"], t["new"], t["note"]) for t in turns] == [
        (1, 1, ""),
        (2, 2, "tool calls differ"),
        (None, 3, "added"),
    ]
    _, texts = run_compare(recordings["base"], recordings["failed"], tmp_path)
    turns = json.loads(texts["json"])["turns"]
    assert turns[1]["note"] == "outcome completed → failed"
    assert "outcome completed → failed" in texts["text"]
    _, texts = run_compare(recordings["base"], recordings["tokens"], tmp_path)
    turns = json.loads(texts["json"])["turns"]
    assert [t["note"] for t in turns] == ["", "tokens +36.8%"]  # 117 → 160 in turn 2
    assert turns[1]["tokens"] == "117 → 160"
    assert not re.search(r"\badded$", texts["text"], re.MULTILINE)


def test_html_is_self_contained_with_both_runs_charts(recordings, tmp_path):
    _, texts = run_compare(recordings["base"], recordings["added"], tmp_path)
    page = texts["html"]
    assert "<script" not in page
    assert not re.search(r"""(src|href)=["']?(https?:)?//""", page)
    # Side by side: BASE's 2 turns and NEW's 3, three stacked parts each, on the same axes
    # (3 turn slots each, one token range, one ms and event range).
    assert page.count('class="bar"') == (2 + 3) * 3 and page.count("<polyline") == 5
    axes = re.findall(r'aria-label="([^"]+)"[^>]*data-x-max="(\d+)" data-y-max="(\d+)"', page)
    assert len(axes) == 4 and len(set(axes)) == 2, axes
    assert ("tokens per turn", "3") in {a[:2] for a in axes}


def test_an_older_recording_without_a_format_version_reads_as_version_1(recordings, tmp_path):
    old = tmp_path / "old"
    shutil.copytree(recordings["base"], old)
    summary = json.loads((old / "summary.json").read_text())
    del summary["format_version"]
    (old / "summary.json").write_text(json.dumps(summary))
    code, texts = run_compare(old, recordings["base"], tmp_path)
    assert code == 0 and json.loads(texts["json"])["base"]["format_version"] == 1


def broken(recordings: dict[str, Path], tmp_path: Path, how: str) -> tuple[Path, str]:
    """A copy of the base recording broken in one way, and the reason compare must give."""
    rec = tmp_path / f"broken-{how}"
    shutil.copytree(recordings["base"], rec)
    if how == "truncated-ledger":
        data = (rec / "usage.jsonl").read_bytes()
        (rec / "usage.jsonl").write_bytes(data[: len(data) - 40])
        return rec, r": usage\.jsonl line 2: not JSON"
    if how == "lost-line":
        lines = (rec / "usage.jsonl").read_text().splitlines(keepends=True)
        (rec / "usage.jsonl").write_text(lines[0])
        return rec, r"usage\.jsonl: 1 line\(s\) but summary\.json has 2 request\(s\)"
    if how == "missing-summary":
        (rec / "summary.json").unlink()
        return rec, r"summary\.json: missing; the proxy writes it when it stops cleanly"
    if how == "not-json-summary":
        (rec / "summary.json").write_text('{"requests": [')
        return rec, r"summary\.json: not readable JSON"
    if how == "future-format":
        summary = json.loads((rec / "summary.json").read_text())
        (rec / "summary.json").write_text(json.dumps({**summary, "format_version": 99}))
        return rec, r"summary\.json: format version 99 is unknown to this compare"
    if how == "broken-dump":
        dump = next((rec / "dumps").glob("*-response.json"))
        dump.write_text("{")
        return rec, rf"{re.escape(dump.name)}: not JSON"
    if how == "not-a-recording":
        shutil.rmtree(rec)
        rec.mkdir()
        (rec / "notes.txt").write_text("hello")
        return rec, r"not a recording \(no summary\.json, usage\.jsonl or dumps/\)"
    assert how == "no-directory"
    shutil.rmtree(rec)
    return rec, r"not a directory"


@pytest.mark.parametrize(
    "how",
    [
        "truncated-ledger",
        "lost-line",
        "missing-summary",
        "not-json-summary",
        "future-format",
        "broken-dump",
        "not-a-recording",
        "no-directory",
    ],
)
@pytest.mark.parametrize("side", ["BASE", "NEW"])
def test_an_unreadable_recording_exits_2_saying_which_file_and_why(
    recordings, tmp_path, capsys, how, side
):
    bad, reason = broken(recordings, tmp_path, how)
    pair = [recordings["base"], bad] if side == "NEW" else [bad, recordings["base"]]
    code = compare.main([str(pair[0]), str(pair[1]), "--html", str(tmp_path / "c.html")])
    err = capsys.readouterr().err
    assert code == 2
    assert re.search(rf"error: {side} {re.escape(str(bad))}.*{reason}", err), err


@pytest.mark.parametrize(
    "spec, message",
    [
        ("tokens_pc=3", "unknown threshold 'tokens_pc'"),
        ("tokens_pct=lots", "tokens_pct: expected a number"),
        ("new_tool=3", "new_tool: expected true or false"),
        ("tokens_pct", "expected name=value"),
    ],
)
def test_a_bad_threshold_exits_2(recordings, tmp_path, capsys, spec, message):
    args = [str(recordings["base"]), str(recordings["base"]), "--set", spec]
    assert compare.main([*args, "--html", str(tmp_path / "c.html")]) == 2
    assert message in capsys.readouterr().err


def test_an_output_that_cannot_be_written_exits_2(recordings, tmp_path, capsys):
    args = [str(recordings["base"]), str(recordings["same"]), "--html", str(tmp_path / "c.html")]
    assert compare.main([*args, "--json", str(tmp_path / "missing" / "c.json")]) == 2
    assert "cannot write the comparison" in capsys.readouterr().err


def test_the_shipped_thresholds_file_names_every_threshold_with_timing_off():
    thresholds = compare.load_thresholds(compare.DEFAULT_CONFIG)
    assert set(thresholds) == set(compare.THRESHOLDS)
    assert all(
        v is None for k, v in thresholds.items() if k.startswith(("first_event", "duration"))
    )
    text = compare.DEFAULT_CONFIG.read_text()
    assert "noisy" in text and thresholds["tokens_pct"] == 25


def test_markdown_and_json_go_to_stdout_in_place_of_the_table(recordings, tmp_path, capsys):
    page = str(tmp_path / "c.html")
    assert (
        compare.main([str(recordings["base"]), str(recordings["tokens"]), "--json", "--html", page])
        == 1
    )
    result = json.loads(capsys.readouterr().out)
    assert result["exit_code"] == 1 and result["verdict"].startswith("REGRESSION")
    assert (
        compare.main(
            [str(recordings["base"]), str(recordings["tokens"]), "--markdown", "--html", page]
        )
        == 1
    )
    assert capsys.readouterr().out.startswith("### ❌ Codex recording compare: REGRESSION")


def test_run_sh_compare_writes_compare_html_into_new(recordings, tmp_path):
    new = tmp_path / "new"
    shutil.copytree(recordings["same"], new)
    proc = subprocess.run(
        [str(ROOT / "run.sh"), "compare", str(recordings["base"]), str(new)],
        capture_output=True,
        text=True,
        timeout=300,
        stdin=subprocess.DEVNULL,
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("PASS") and (new / "compare.html").exists()
    assert (new / "compare.html").stat().st_mode & 0o777 == 0o600  # like the recording
    proc = subprocess.run(
        [str(ROOT / "run.sh"), "compare", str(recordings["base"]), str(tmp_path / "nothing")],
        capture_output=True,
        text=True,
        timeout=300,
        stdin=subprocess.DEVNULL,
    )
    assert proc.returncode == 2 and "not a directory" in proc.stderr


def test_replayed_and_rerecorded_compares_equal(recordings, tmp_path):
    """record → ./run.sh replay → re-record → compare: 0, every non-timing figure equal."""
    rerecorded = tmp_path / "rerecorded"
    info = tmp_path / "replay-info.json"
    log = open(tmp_path / "replay.log", "wb")
    proc = subprocess.Popen(
        [
            *(sys.executable, "-m", "addons.replay", str(recordings["refusal"])),
            *("--server-info", str(info), "--http-shutdown", "--record", str(rerecorded)),
        ],
        stdin=subprocess.DEVNULL,
        stdout=log,
        stderr=subprocess.STDOUT,
        cwd=ROOT,
    )
    try:
        wait_for(lambda: info.exists() or proc.poll() is not None, 60, "replay server-info")
        assert proc.poll() is None, (tmp_path / "replay.log").read_text()
        port = json.loads(info.read_text())["port"]
        logs = tmp_path / "replay.log"
        handle = ProxyProcess(proc, port, info, logs, logs, None, True)
        play(handle, None, SCENARIOS["refusal"])
        assert handle.shutdown() == 0
    finally:
        if proc.poll() is None:
            proc.kill()
        log.close()
    code, texts = run_compare(recordings["refusal"], rerecorded, tmp_path)
    assert code == 0, texts["text"]
    result = json.loads(texts["json"])
    changed = [f["name"] for f in result["figures"] if f["changed"] and not f["timing"]]
    assert changed == []
    names = {f["name"] for f in result["figures"]}
    assert {"refusals not-allowlisted (403)", "tool shell calls", "credits"} <= names


def test_gateway_recordings_compare_with_a_new_refusal(gateway, upstream, tmp_path):
    from tests.gateway_harness import bearer

    gateway.admin("add-member", "alice")
    key = gateway.add_key("alice")
    runs = {}
    for name, extra_refusal in (("base", False), ("new", True)):
        record = tmp_path / f"gw-{name}"
        server = gateway.serve(upstream.url, "--record", str(record))
        for payload in (body(0), body(1)):
            assert server.post_json(payload, bearer(key))[0] == 200
        if extra_refusal:
            refused = server.post_json(body(1), bearer("sk-codex-gw-" + "Z" * 43))[0]
            assert refused in (400, 401)  # an unknown member key, refused by the gateway
        assert server.shutdown() == 0
        runs[name] = record
    code, texts = run_compare(runs["base"], runs["base"], tmp_path)
    assert code == 0, texts["text"]
    code, texts = run_compare(runs["base"], runs["new"], tmp_path)
    assert code == 1
    figure = next(
        f for f in json.loads(texts["json"])["figures"] if f["name"].startswith("refusals")
    )
    assert figure["regression"] and figure["change"] == "new kind"
    assert figure["name"] == f"refusals member-auth ({refused})", figure


# ---------------------------------------------------------------- alignment


def record(usage: dict[str, int] | None = None, **kw: Any) -> RequestRecord:
    fields = {"seq": 1, "started": 0.0, "duration_ms": 5, "status": 200, "model": "m"}
    fields.update(events=3, usage=usage, completed=True, turn_status="completed")
    fields.update(kw)
    return RequestRecord(**fields)  # type: ignore[arg-type]


#: A turn's alignment keys as RunTurn.keys() gives them: (model + input types, input types).
KEYS = st.tuples(st.sampled_from("ABC"), st.sampled_from("xyz")).map(lambda k: (k, k[1]))


@given(st.lists(KEYS, max_size=12), KEYS, st.data())
def test_inserting_a_turn_is_reported_as_exactly_one_added(turns, extra, data):
    at = data.draw(st.integers(0, len(turns)))
    new = [*turns[:at], extra, *turns[at:]]
    pairs = compare.align(turns, new)
    added = [j for i, j in pairs if i is None]
    assert len(added) == 1 and new[added[0]] == extra
    assert all(j is not None for i, j in pairs)
    matched = [(i, j) for i, j in pairs if i is not None and j is not None]
    assert len(matched) == len(turns) and all(turns[i] == new[j] for i, j in matched)
    assert [i for i, _ in matched] == sorted(i for i, _ in matched)


@given(st.lists(KEYS, min_size=1, max_size=12), st.data())
def test_removing_a_turn_is_reported_as_exactly_one_missing(turns, data):
    at = data.draw(st.integers(0, len(turns) - 1))
    new = [*turns[:at], *turns[at + 1 :]]
    pairs = compare.align(turns, new)
    missing = [i for i, j in pairs if j is None]
    assert len(missing) == 1 and turns[missing[0]] == turns[at]
    assert all(i is not None for i, _ in pairs)
    assert all(turns[i] == new[j] for i, j in pairs if i is not None and j is not None)


def test_a_turn_whose_shape_changed_is_paired_not_added():
    base = [("m", "t", "1"), ("m", "t", "2"), ("m", "t", "3")]
    base_keys = [((m, t, i), i) for m, t, i in base]
    new_keys = [base_keys[0], (("m2", "t", "2"), "2"), base_keys[2]]
    assert compare.align(base_keys, new_keys) == [(0, 0), (1, 1), (2, 2)]
    # A model change everywhere: turns still pair by their input types.
    moved = [(("m2", t, i), i) for _, t, i in base]
    assert compare.align(base_keys, moved[:1] + moved[2:]) == [(0, 0), (1, None), (2, 1)]


def test_token_kinds_are_read_from_what_the_recording_holds():
    """A kind only one run has (cache_write, from input_tokens_details.cache_write_tokens)
    reads as 0 in the other, and is compared and gated like the others."""
    usage = {"input": 10, "cached": 0, "output": 5, "reasoning": 0, "total": 15}
    base = compare.Run("b", 1, [compare.RunTurn(1, record(usage), None)], [], None, None)
    new_usage = {**usage, "cache_write": 7}
    new = compare.Run("n", 1, [compare.RunTurn(1, record(new_usage), None)], [], None, None)
    assert compare.token_kinds(base, new) == [
        "input",
        "cached",
        "cache_write",
        "output",
        "reasoning",
        "total",
    ]
    result = compare.compare(base, new, compare.load_thresholds(compare.DEFAULT_CONFIG))
    figure = next(f for f in result.figures if f.name == "tokens cache_write")
    assert (figure.base, figure.new, figure.change, figure.regression) == (0, 7, "new", True)


def test_outcomes():
    assert compare.outcome_of(record()) == "completed"
    assert compare.outcome_of(record(turn_status="incomplete", completed=False)) == "incomplete"
    assert compare.outcome_of(record(turn_status=None, completed=False, status=502)) == "failed"
    assert compare.outcome_of(record(turn_status=None, completed=False, status=None)) == "failed"
    assert compare.outcome_of(record(turn_status=None, completed=False)) == "cut"


@pytest.mark.parametrize(
    "values, p50, p95", [([], None, None), ([7], 7, 7), (list(range(1, 101)), 50, 95)]
)
def test_percentile_is_nearest_rank(values, p50, p95):
    assert compare.percentile(values, 50) == p50 and compare.percentile(values, 95) == p95


@pytest.mark.parametrize(
    "new, label, code",
    [("same", "false", 0), ("tools", "false", 1), ("tools", "true", 0), ("broken", "true", 2)],
)
def test_the_github_actions_gate_step_runs_as_documented(recordings, tmp_path, new, label, code):
    """The example workflow's compare step, run by bash as the runner would: a regression
    fails it unless the pull request carries the accept label; an unreadable one always."""
    import yaml

    from tests.test_examples import EXAMPLE

    steps = yaml.safe_load(EXAMPLE.read_text())["jobs"]["codex-smoke"]["steps"]
    script = next(s["run"] for s in steps if "run.sh compare" in s.get("run", ""))
    runner = tmp_path / "runner"
    runner.mkdir()
    shutil.copytree(recordings["base"], runner / "codex-baseline")
    if new == "broken":
        (runner / "codex-recording").mkdir()
    else:
        shutil.copytree(recordings[new], runner / "codex-recording")
    (tmp_path / ".proxy").symlink_to(ROOT)
    summary = tmp_path / "step-summary.md"
    env = {"RUNNER_TEMP": str(runner), "GITHUB_STEP_SUMMARY": str(summary), "ACCEPT": label}
    proc = subprocess.run(
        ["bash", "-e", "-c", script],
        cwd=tmp_path,
        env={"PATH": "/usr/bin:/bin", "HOME": str(tmp_path), **env},
        capture_output=True,
        text=True,
        timeout=300,
        stdin=subprocess.DEVNULL,
    )
    assert proc.returncode == code, proc.stderr
    if new == "tools":
        assert "tool apply_patch calls" in summary.read_text()
        assert ("Accepted with the accept-codex-change label" in summary.read_text()) == (
            label == "true"
        )
        assert (runner / "codex-recording" / "compare.html").exists()
    if new == "broken":
        assert "not a recording" in proc.stderr


@pytest.mark.e2e
def test_compare_html_in_chromium_shows_both_runs_side_by_side(recordings, tmp_path):
    """The page as a reviewer opens it from a downloaded artifact (screenshot kept in
    test-artifacts/compare.png)."""
    from tests.test_web import chrome

    run_compare(recordings["base"], recordings["added"], tmp_path, "--set", "turns_added=0")
    driver = chrome()
    try:
        driver.set_window_size(1200, 1600)
        driver.get((tmp_path / "compare.html").as_uri())
        verdict = driver.find_element("css selector", "p").text
        pair = driver.find_elements("css selector", "div.pair")
        charts = [len(t.find_elements("css selector", ".side svg.chart")) for t in pair]
        regressions = [row.text for row in driver.find_elements("css selector", "tr.fail")]
        artifacts = ROOT / "test-artifacts"
        artifacts.mkdir(exist_ok=True)
        driver.save_screenshot(str(artifacts / "compare.png"))
    finally:
        driver.quit()
    assert verdict.startswith("REGRESSION") and "turns added" in verdict
    assert charts == [2, 2]  # tokens and event arrival, BASE beside NEW
    assert any("turns added" in row for row in regressions)
    assert (ROOT / "test-artifacts" / "compare.png").stat().st_size > 10_000


# ---------------------------------------------------------------- retries (issue 29)


def attempt(request: tuple[str, str | None] | None, status: int = 409, **kw: Any) -> Any:
    """A turn of one request: completed (200) or an error status without a reply."""
    done = status == 200
    rec = record(
        {"input": 10, "output": 2, "total": 12} if done else None,
        status=status,
        completed=done,
        turn_status="completed" if done else None,
        **kw,
    )
    return compare.RunTurn(0, rec, {"input": "i", "tools": "t"}, [], request)


def test_codex_retries_of_one_request_are_one_turn():
    """Codex 0.171 resends a request refused 409 five times, the same body and
    x-client-request-id each time: six ledger lines, one turn with five retries."""
    turns = [attempt(("a", "id-1"), 200)] + [attempt(("b", "id-2")) for _ in range(6)]
    folded = compare.fold_retries(turns)
    assert [len(t.retried) for t in folded] == [0, 5] and [t.index for t in folded] == [1, 2]
    assert len(folded[1].attempts) == 6 and folded[1].outcome == "failed"


@pytest.mark.parametrize(
    "second, retry",
    [
        (("a", "id-1"), True),
        (("a", None), True),  # a dump without the header: the body decides
        (("a", "id-2"), False),  # another request of the same body
        (("b", "id-1"), False),  # a request that changed
        (None, False),  # no dump: unknown, never folded
    ],
)
def test_what_makes_a_retry(second, retry):
    first = attempt(("a", "id-1"))
    assert compare.is_retry(first, attempt(second)) is retry
    # A request that completed is never retried: the same one again is a turn of its own.
    assert not compare.is_retry(attempt(("a", "id-1"), 200), attempt(second))


def test_compare_counts_a_retried_turn_once_and_names_its_retries():
    base = compare.Run("b", 1, [attempt(("a", "1"), 200)], [], None, None)
    new_turns = [attempt(("a", "1"), 200)] + [attempt(("c", "2")) for _ in range(6)]
    new = compare.Run("n", 1, compare.fold_retries(new_turns), [], None, None)
    result = compare.compare(base, new, compare.load_thresholds(compare.DEFAULT_CONFIG))
    figures = {f.name: f for f in result.figures}
    assert (figures["turns added"].new, figures["turns failed"].new) == (1, 1)
    assert (figures["retries"].base, figures["retries"].new) == (0, 5)
    assert (figures["requests"].base, figures["requests"].new) == (1, 7)
    assert figures["HTTP 409"].new == 6
    assert [t.note for t in result.turns] == ["", "added; NEW: 5 retries"]


# ---------------------------------------------------------------- Markdown quoting (issue 30)

HOSTILE = [
    "<img src=x onerror=alert(1)>",
    "<script>alert(1)</script>",
    "a | b || c",
    "two\nlines\r\nthree",
    "[click](https://evil.example) www.evil.example `code` **bold** _em_",
]


@pytest.mark.parametrize("value", HOSTILE)
def test_markdown_quotes_every_value_as_text(value):
    """A model name, a refusal reason and a path from a recording reach the GitHub step
    summary as text: no HTML element, no link, and every table row keeps its columns
    (rendered by a CommonMark parser with GitHub's table extension, raw HTML on)."""
    from markdown_it import MarkdownIt

    base = compare.Run(f"base {value}", 1, [attempt(("a", "1"), 200)], [], None, None)
    hostile = attempt(("a", "1"), 200, model=value)
    refused = [{"reason": value, "status": 403, "path": value}]
    new = compare.Run(value, 1, [hostile], refused, None, None)
    result = compare.compare(base, new, compare.load_thresholds(compare.DEFAULT_CONFIG))
    text = compare.as_markdown(result)
    page = MarkdownIt("commonmark").enable("table").render(text)
    assert "<img" not in page and "<script" not in page and "<a " not in page
    assert "<code>" not in page and "<strong>bold" not in page and "<em>em" not in page
    rows = re.findall(r"<tr>(.*?)</tr>", page, re.S)
    widths = {len(re.findall(r"<t[hd][ >]", row)) for row in rows}
    assert widths == {6, 7}, page  # the figures' table and the turns' table, each whole
    # Shown as written (line breaks as spaces) in the turns' model cell: "m → <value>".
    cells = [html.unescape(c) for c in re.findall(r"<td>(.*?)</td>", page, re.S)]
    assert f"m → {' '.join(value.split())}" in cells, cells


def lcs_length(a: list[str], b: list[str]) -> int:
    """The textbook dynamic programme, for reference."""
    row = [0] * (len(b) + 1)
    for x in a:
        prev, row = row, [0]
        for j, y in enumerate(b):
            row.append(prev[j] + 1 if x == y else max(prev[j + 1], row[j]))
    return row[-1]


@given(
    st.lists(st.sampled_from("ABCD"), max_size=14), st.lists(st.sampled_from("ABCE"), max_size=14)
)
def test_the_alignments_shortcuts_keep_a_longest_common_subsequence(a, b):
    """Matching the common head and tail directly and leaving out what one side lacks (so a
    hostile or unrelated run costs no quadratic table) still finds a longest one."""
    pairs = compare._lcs(a, b)
    assert len(pairs) == lcs_length(a, b)
    assert all(a[i] == b[j] for i, j in pairs)
    assert [i for i, _ in pairs] == sorted({i for i, _ in pairs})
    assert [j for _, j in pairs] == sorted({j for _, j in pairs})
