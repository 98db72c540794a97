"""Models per member: the pattern rule (addons/gateway_mode/model_policy.py) and the addons
that apply it (addons/gateway_mode/member_models.py), with taddons/tflow."""

from __future__ import annotations

import json

import pytest
from mitmproxy.test import taddons, tflow

from addons.allowlist import Allowlist
from addons.codex_models import full_catalog
from addons.common import ALLOWED, LOCAL_ROUTE, REFUSED
from addons.gateway_mode.core import MEMBER, REQUEST_INFO, GatewayCore
from addons.gateway_mode.member_models import (
    MemberCatalog,
    ModelGate,
    ModelsRoute,
    catalog_reply,
    model_refusal,
)
from addons.gateway_mode.model_policy import (
    allowed,
    allowed_entries,
    base_model,
    matches,
    parse_patterns,
    patterns_text,
    refusal_message,
)


@pytest.mark.parametrize(
    ("model", "pattern", "expected"),
    [
        ("gpt-5.6-luna", "gpt-5.6-luna", True),
        ("gpt-5.6-luna", "gpt-5.6-*", True),
        ("gpt-5.6-luna", "*luna", True),
        ("gpt-5.6-luna", "gpt-*-luna", True),
        ("gpt-5.6-luna", "*", True),
        ("gpt-5.6-luna", "gpt-5.6", False),  # whole name only
        ("gpt-5.6-luna", "GPT-5.6-LUNA", False),  # case-sensitive, as model names are
        ("gpt-5x6-luna", "gpt-5.6-luna", False),  # "." is no wildcard
        ("gpt-5.6-luna", "gpt-5.6-luna*", True),  # "*" matches an empty run too
        ("gpt-6-sol", "gpt-6?sol", False),  # "?" is no wildcard (and no valid pattern)
    ],
)
def test_a_star_matches_any_run_and_nothing_else_is_special(model, pattern, expected):
    assert matches(model, pattern) is expected


def test_patterns_parse_normalise_and_refuse_what_no_model_holds():
    assert parse_patterns(None) == parse_patterns("") == parse_patterns(" , ,") == ()
    assert parse_patterns(" gpt-5.6-luna , gpt-6*,gpt-5.6-luna") == ("gpt-5.6-luna", "gpt-6*")
    assert patterns_text(()) is None
    assert patterns_text(("a", "b*")) == "a,b*"
    for bad in ("gpt 5", "gpt-5;drop", "gpt-5?", "x" * 101):
        with pytest.raises(ValueError, match="model pattern"):
            parse_patterns(bad)
    with pytest.raises(ValueError, match="at most 50"):
        parse_patterns(",".join(f"m{i}" for i in range(51)))


def test_every_non_empty_list_must_allow_and_variants_are_judged_by_their_base():
    member, team = ("gpt-5.6-luna", "gpt-6*"), ("gpt-6-sol",)
    assert allowed("anything") and allowed("anything", (), ())
    assert allowed("gpt-5.6-luna", member) and not allowed("gpt-5.5", member)
    assert allowed("gpt-6-sol", member, team)
    assert not allowed("gpt-6-luna", member, team)  # the member may, the team may not
    assert not allowed("gpt-5.6-luna", member, team)
    assert allowed("gpt-5.6-luna", member, ())  # an empty list does not restrict
    # The bridge's effort suffixes: judged by the base model, by the bridge's own rule.
    assert base_model("gpt-5.6-luna-xhigh") == "gpt-5.6-luna"
    assert allowed("gpt-5.6-luna-high", member) and not allowed("gpt-5.5-high", member)
    assert base_model("gpt-5.1-codex-max") == "gpt-5.1-codex-max"  # a model of its own
    assert not allowed("gpt-5.1-codex-max", ("gpt-5.1-codex",))
    # A request naming no model passes only where nothing restricts.
    assert allowed(None) and not allowed(None, member) and not allowed("", member)


def test_allowed_entries_filter_the_catalog_in_its_order():
    _, entries = full_catalog()
    slugs = [e["slug"] for e in allowed_entries(entries, ("gpt-6-*", "gpt-5.5"))]
    assert slugs == ["gpt-6-astra", "gpt-6-sol", "gpt-6-luna", "gpt-5.5"]
    assert len(list(allowed_entries(entries))) == len(entries) == 14


def test_the_refusal_names_the_model_what_the_member_may_use_and_how_to_pick_it():
    text = refusal_message("gpt-5.5", "ivy", ["gpt-6*", "gpt-5.6-luna"])
    assert "model 'gpt-5.5' is not allowed for member 'ivy'" in text
    assert "it may use: gpt-6*, gpt-5.6-luna" in text
    assert 'codex -m gpt-5.6-luna, or model = "gpt-5.6-luna" in config.toml' in text
    assert "names no model" in refusal_message(None, "ivy", ["gpt-6*"])
    assert model_refusal({"member": "ivy", "models": None}, "gpt-5.5") is None
    assert "it may use: gpt-6*" in str(model_refusal({"member": "ivy", "models": "gpt-6*"}, "x"))
    # A stored value no admin command wrote: no model passes (fail closed).
    assert model_refusal({"member": "ivy", "models": "bad value!"}, "gpt-6-sol") is not None


def test_the_catalog_reply_is_codex_format_and_empty_for_another_codex_version():
    version, entries = full_catalog()
    body = json.loads(catalog_reply([("gpt-5.6-luna",)], version).content or b"")
    assert body == {"models": [e for e in entries if e["slug"] == "gpt-5.6-luna"]}
    assert len(json.loads(catalog_reply([()], None).content or b"")["models"]) == 14
    assert json.loads(catalog_reply([()], "0.0.1").content or b"") == {"models": []}


def models_flow(target: bytes = b"/v1/models?client_version=0.171.0"):
    flow = tflow.tflow()
    flow.request.method = "GET"
    flow.request.data.path = target
    flow.request.content = b""
    return flow


def member_core(models: str | None) -> GatewayCore:
    core = GatewayCore()
    core.directory.load(
        [
            {
                "key_id": "k1",
                "key_hash": "h",
                "member_id": 1,
                "member": "ivy",
                "max_concurrent": 0,
                "models": models,
            }
        ]
    )
    return core


def test_get_v1_models_reaches_member_auth_on_the_gateway_only():
    allowlist = Allowlist()
    with taddons.context(allowlist):
        # The strict proxy keeps its contract: 403, nothing marked.
        strict = models_flow()
        allowlist.requestheaders(strict)
        assert strict.response is not None and strict.response.status_code == 403
        assert ALLOWED not in strict.metadata
        # Claimed by the gateway's route: let on to member auth.
        for target in (b"/v1/models", b"/v1/models?client_version=0.171.0"):
            flow = models_flow(target)
            ModelsRoute().requestheaders(flow)
            assert flow.metadata[LOCAL_ROUTE] == "models"
            allowlist.requestheaders(flow)
            assert flow.response is None and flow.metadata[ALLOWED] is True
    for other in (b"/v1/models/x", b"/v1/modelsx", b"/v1/models/"):
        flow = models_flow(other)
        ModelsRoute().requestheaders(flow)
        assert LOCAL_ROUTE not in flow.metadata
    post = models_flow(b"/v1/models")
    post.request.method = "POST"
    ModelsRoute().requestheaders(post)
    assert LOCAL_ROUTE not in post.metadata


def test_the_member_catalog_answers_locally_and_never_leaves_it_forwardable():
    catalog = MemberCatalog(member_core("gpt-6-*"))
    flow = models_flow()
    flow.metadata.update({LOCAL_ROUTE: "models", ALLOWED: True})
    flow.metadata[MEMBER] = {"member": "ivy", "member_id": 1, "key_id": "k1"}
    catalog.requestheaders(flow)
    assert ALLOWED not in flow.metadata and flow.metadata[REFUSED] == "local-route"
    assert flow.response is not None and flow.response.status_code == 200
    slugs = [m["slug"] for m in json.loads(flow.response.content or b"")["models"]]
    assert slugs == ["gpt-6-astra", "gpt-6-sol", "gpt-6-luna"]
    # Allowlisted but no member accepted and nothing answered: killed, never forwarded.
    lost = models_flow()
    lost.metadata.update({LOCAL_ROUTE: "models", ALLOWED: True})
    catalog.requestheaders(lost)
    assert lost.response is None and lost.error is not None and ALLOWED not in lost.metadata


@pytest.mark.parametrize(
    ("models", "model", "refused"),
    [
        (None, "gpt-5.5", False),
        ("gpt-5.6-luna", "gpt-5.6-luna", False),
        ("gpt-5.6-luna", "gpt-5.5", True),
        ("gpt-5.6-luna", None, True),
    ],
)
def test_the_model_gate_refuses_403_naming_model_and_patterns(models, model, refused):
    core = member_core(models)
    gate = ModelGate(core)
    flow = tflow.tflow()
    flow.metadata[ALLOWED] = True
    flow.metadata[MEMBER] = {"member": "ivy", "member_id": 1, "key_id": "k1"}
    flow.metadata[REQUEST_INFO] = {"model": model, "service_tier": None, "session": None}
    gate.request(flow)
    if not refused:
        assert flow.response is None and flow.metadata[ALLOWED] is True
        return
    assert flow.response is not None and flow.response.status_code == 403
    error = json.loads(flow.response.content or b"")["error"]
    assert error["code"] == "model_not_allowed" and error["allowed"] == ["gpt-5.6-luna"]
    assert error["model"] == model and "it may use: gpt-5.6-luna" in error["message"]
    assert ALLOWED not in flow.metadata and flow.metadata[REFUSED] == "model-not-allowed"
    metrics = core.metrics.render(core.pool, 0).decode()
    assert 'codex_gateway_refused_total{reason="model_not_allowed"} 1.0' in metrics
