"""The playground's JSON API through a test client: every endpoint, its errors, and the
promise that the Size numbers are `moelab size`'s own."""

from __future__ import annotations

import json

import pytest
import torch
from fastapi.testclient import TestClient

from moelab.cli.main import main
from moelab.playground.sizing import moelab_config_json

from .conftest import wait_for


@pytest.fixture(scope="module")
def client(served):
    app, _ = served
    with TestClient(app) as c:
        yield c


def cli_size(capsys, path) -> tuple[int, str, str]:
    code = main(["size", str(path)])
    out = capsys.readouterr()
    return code, out.out, out.err


def assert_rows_match_cli(rows: list[dict], cli_out: str) -> None:
    """Every formatted cell of the reply is on the CLI's line for the same label."""
    lines = cli_out.splitlines()
    for row in rows:
        if "section" in row:
            assert f"-- {row['section']} --" in lines
            continue
        line = next(ln for ln in lines if ln.startswith(row["label"] + " ") and ln.endswith(row["value"]))
        assert line[len(row["label"]):-len(row["value"])].strip() == "", (row, line)


CONTROL_SETS = [
    {},  # the defaults: Mixtral 8x7B's shape
    {"num_experts": 16, "top_k": 4, "d_expert": 2048},
    {"num_shared_experts": 2, "first_dense_layers": 3, "moe_layer_freq": 2, "tie_embeddings": True},
    {"num_experts": 0, "n_layers": 12, "d_model": 1024, "n_heads": 16, "n_kv_heads": 16},
]


@pytest.mark.parametrize("controls", CONTROL_SETS)
def test_size_controls_equal_moelab_size(client, tmp_path, capsys, controls):
    r = client.post("/api/size", json={"model": controls})
    assert r.status_code == 200, r.text
    reply = r.json()
    path = tmp_path / "config.json"
    path.write_text(json.dumps(moelab_config_json(controls)))
    code, out, _ = cli_size(capsys, path)
    assert code == 0
    assert_rows_match_cli(reply["rows"], out)
    assert f"in short ({path}): {reply['headline']}" in out
    cli = json.loads((main(["size", str(path), "--json"]), capsys.readouterr().out)[1])
    for key in ("total_params", "active_params", "flops_per_token", "kv_cache_bytes", "min_gpus", "moe_layers"):
        assert reply["report"][key] == cli[key]


def test_config_json_of_the_controls(client, tmp_path, capsys):
    controls = {"num_experts": 32, "top_k": 4, "d_expert": 1024}
    cfg = client.post("/api/size/config.json", json={"model": controls}).json()
    assert cfg == moelab_config_json(controls)
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    code, out, _ = cli_size(capsys, tmp_path / "config.json")
    assert code == 0
    assert_rows_match_cli(client.post("/api/size", json={"model": controls}).json()["rows"], out)
    r = client.post("/api/size/config.json", json={"model": {"top_k": 99}})
    assert r.status_code == 400 and r.json()["error"]["field"] == "top_k"


def test_settings_change_the_memory_rows_as_the_flags_do(client, tmp_path, capsys):
    settings = {"dtype": "fp8", "context": 32768, "batch": 4, "gpu_memory_gb": 24}
    reply = client.post("/api/size", json={"model": {}, "settings": settings}).json()
    path = tmp_path / "config.json"
    path.write_text(json.dumps(moelab_config_json({})))
    assert main(["size", str(path), "--dtype", "fp8", "--context", "32768", "--batch", "4", "--gpu-memory", "24"]) == 0
    assert_rows_match_cli(reply["rows"], capsys.readouterr().out)


def test_textbook_preset(client):
    reply = client.post("/api/size", json={"preset": "textbook-8x7b"}).json()
    assert reply["headline"] == "63.0B total, 21.0B active, 6 of 8 experts skipped, 75% of feed-forward compute saved"
    cells = {row["label"]: row["value"] for row in reply["rows"] if "label" in row}
    assert (cells["total"], cells["active per token"]) == ("63.0B", "21.0B")
    assert (cells["routed experts skipped"], cells["FFN compute saved"]) == ("6 of 8", "75%")
    assert reply["controls"]["num_experts"] == 8 and reply["controls"]["top_k"] == 2


def test_presets_list_every_size_and_model_preset(client):
    from moelab.accounting.published import PRESETS
    from moelab.model.presets import PRESETS as MODEL_PRESETS

    d = client.get("/api/presets").json()
    names = [p["name"] for p in d["presets"]]
    assert names == [*PRESETS, *MODEL_PRESETS]
    assert {c["name"] for c in d["controls"]} >= {"num_experts", "top_k", "d_expert", "n_heads", "n_kv_heads"}
    tiny = next(p for p in d["presets"] if p["name"] == "tiny-moe")
    assert tiny["exact_controls"]
    # An exact preset's controls size to the preset itself.
    by_controls = client.post("/api/size", json={"model": tiny["controls"]}).json()
    by_name = client.post("/api/size", json={"preset": "tiny-moe"}).json()
    assert by_controls["report"]["total_params"] == by_name["report"]["total_params"]


@pytest.mark.parametrize("controls, field", [
    ({"top_k": 9}, "top_k"),
    ({"n_heads": 32, "n_kv_heads": 5}, "n_heads"),
    ({"n_heads": 6, "n_kv_heads": 2}, "d_model"),
    ({"n_layers": 0}, "n_layers"),
    ({"first_dense_layers": 40}, "first_dense_layers"),
])
def test_bad_controls_get_the_cli_error(client, tmp_path, capsys, controls, field):
    r = client.post("/api/size", json={"model": controls})
    assert r.status_code == 400
    err = r.json()["error"]
    assert err["field"] == field
    path = tmp_path / "config.json"
    path.write_text(json.dumps(moelab_config_json(controls, validate=False)))
    code, _, stderr = cli_size(capsys, path)
    assert code == 2
    assert stderr.strip().endswith(err["message"])  # the CLI's one line, after its path prefix
    assert "\n" not in err["message"]


@pytest.mark.parametrize("body, field, status", [
    ({"config_text": "{not json", "filename": "mine.json"}, "config_text", 400),
    ({"config_text": "[1, 2]", "filename": "mine.json"}, "config_text", 400),
    ({"config_text": json.dumps({"model_type": "mixtral", "num_local_experts": 4, "num_experts_per_tok": 9}),
      "filename": "mine.json"}, "config_text", 400),
    ({"preset": "no-such-model"}, "preset", 400),
    ({"model": {}, "settings": {"context": 0}}, "context", 400),
    ({"model": {}, "settings": {"dtype": "fp64"}}, "dtype", 400),
    ({"model": {"experts": 4}}, "experts", 400),
    ({"path": "/etc"}, "path", 403),
    ({}, None, 400),
])
def test_size_errors(client, body, field, status):
    r = client.post("/api/size", json=body)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert err["field"] == field and err["message"]
    if "config_text" in body:
        assert "mine.json" in err["message"] and "moelab-playground-" not in err["message"]


def test_uploaded_config_json_is_sized_like_the_file(client, tmp_path, capsys):
    from moelab.accounting.published import _MIXTRAL_8X7B

    text = json.dumps(_MIXTRAL_8X7B)
    reply = client.post("/api/size", json={"config_text": text, "filename": "config.json"}).json()
    (tmp_path / "config.json").write_text(text)
    code, out, _ = cli_size(capsys, tmp_path / "config.json")
    assert code == 0 and reply["headline"].startswith("46.7B total, 12.9B active")
    assert_rows_match_cli(reply["rows"], out)


def test_size_a_served_path(client, model_dir, capsys):
    reply = client.post("/api/size", json={"path": str(model_dir)}).json()
    code, out, _ = cli_size(capsys, model_dir)
    assert code == 0
    assert_rows_match_cli(reply["rows"], out)


def test_not_json_and_unknown_routes(client):
    r = client.post("/api/size", content=b"{", headers={"Content-Type": "application/json"})
    assert r.status_code == 400 and "JSON object" in r.json()["error"]["message"]
    r = client.get("/api/nothing")
    assert r.status_code == 404 and "no such endpoint" in r.json()["error"]["message"]
    assert client.get("/").status_code == 200 and "moelab playground" in client.get("/").text
    assert client.get("/static/app.js").status_code == 200


# --------------------------------------------------------------------------- route


def test_route_gives_each_token_its_topk(client, model_dir):
    from tokenizers import Tokenizer

    from moelab.hf import load_any

    text = "The quick brown fox routes tokens."
    d = client.post("/api/route", json={"model": str(model_dir), "text": text}).json()
    assert d["num_experts"] == 4 and d["top_k"] == 2 and d["layers"] == [0, 1]
    assert "".join(t["text"] for t in d["tokens"]) == text
    # The same decisions as the model's own routing on the same ids.
    loaded = load_any(model_dir)
    tok = Tokenizer.from_file(str(loaded.tokenizer_path))
    ids = tok.encode(text, add_special_tokens=False).ids
    assert [t["id"] for t in d["tokens"]] == ids
    with torch.no_grad():
        routing = loaded.model(torch.tensor([ids]), return_routing=True).routing
    for layer in (0, 1):
        for t, tok_row in enumerate(d["tokens"]):
            r = tok_row["layers"][str(layer)]
            assert sorted(r["experts"]) == sorted(routing[layer].expert_idx[t].tolist())
            assert r["weights"] == sorted(r["weights"], reverse=True)  # first choice first
    firsts = {t["layers"]["0"]["experts"][0] for t in d["tokens"]}
    assert len(firsts) > 1  # the page has more than one colour to show


def test_route_an_imported_hugging_face_checkpoint(client, hf_dir):
    d = client.post("/api/route", json={"model": str(hf_dir), "text": "A router picks the top k experts."}).json()
    assert d["num_experts"] == 4 and d["top_k"] == 2 and d["layers"] == [0, 1]
    assert "".join(t["text"] for t in d["tokens"]) == "A router picks the top k experts."
    assert {"path": str(hf_dir), "kind": "hf", "name": "hf-mixtral"} in client.get("/api/models").json()["models"]


@pytest.mark.parametrize("body, status, field", [
    ({"text": ""}, 400, "text"),
    ({"text": "x" * 5000}, 400, "text"),
    ({"model": "/etc", "text": "hi"}, 403, "model"),
    ({"model": "../../..", "text": "hi"}, 403, "model"),
    ({"model": None, "text": "hi"}, 400, "model"),
])
def test_route_errors(client, model_dir, body, status, field):
    body = {"model": str(model_dir), **body}
    r = client.post("/api/route", json=body)
    assert r.status_code == status, r.text
    assert r.json()["error"]["field"] == field


def test_route_unknown_model_inside_the_folders_is_404(client, model_dir):
    r = client.post("/api/route", json={"model": str(model_dir.parent / "nope"), "text": "hi"})
    assert r.status_code == 404


def test_models_lists_the_served_run(client, model_dir):
    models = client.get("/api/models").json()["models"]
    assert {"path": str(model_dir), "kind": "moelab", "name": model_dir.name} in models


# --------------------------------------------------------------------------- break


@pytest.mark.parametrize("body, field", [
    ({"experiment": "melt"}, "experiment"),
    ({"experiment": "collapse", "scale": "huge"}, "scale"),
    ({"experiment": "collapse", "knobs": {"aux_loss_coef": -1}}, "aux_loss_coef"),
    ({"experiment": "collapse", "knobs": {"lr": "fast"}}, "lr"),
    ({"experiment": "collapse", "knobs": {"temperature": 1}}, "temperature"),
    ({"experiment": "collapse", "knobs": {"steps": 10**6}}, "steps"),
    ({"experiment": "capacity", "knobs": {"capacity_factors": []}}, "capacity_factors"),
    ({"experiment": "collapse", "colour": "red"}, "colour"),
])
def test_bad_run_requests(client, body, field):
    r = client.post("/api/runs", json=body)
    assert r.status_code == 400, r.text
    assert r.json()["error"]["field"] == field


@pytest.mark.parametrize("method, path", [("GET", "/api/runs/nope"), ("GET", "/api/runs/nope/events"),
                                          ("POST", "/api/runs/nope/stop"), ("POST", "/api/runs/nope/resume")])
def test_unknown_run_is_404(client, method, path):
    r = client.request(method, path)
    assert r.status_code == 404 and "nope" in r.json()["error"]["message"]


def events(client, run_id: str) -> list[tuple[str, dict]]:
    out, name = [], None
    with client.stream("GET", f"/api/runs/{run_id}/events") as s:
        for line in s.iter_lines():
            if line.startswith("event: "):
                name = line[7:]
            elif line.startswith("data: "):
                out.append((name, json.loads(line[6:])))
    return out


@pytest.mark.slow
def test_a_run_queues_streams_and_ends_with_the_verdict(client, served, tmp_path):
    from moelab.accounting import count_params
    from moelab.accounting.moelab_config import spec_from_moelab_run
    from moelab.lab.failures import load_experiment
    from moelab.lab.report import build_report

    _, cfg = served
    first = client.post("/api/runs", json={"experiment": "collapse", "knobs": {"steps": 6}}).json()
    second = client.post("/api/runs", json={"experiment": "collapse", "knobs": {"steps": 6}}).json()
    third = client.post("/api/runs", json={"experiment": "capacity", "knobs": {"steps": 6}}).json()
    assert second["state"] == "queued" and second["queue_position"] in (1, 2)
    r = client.post("/api/runs", json={"experiment": "collapse"})
    assert r.status_code == 429  # max_queue 2: the fourth waits for nobody
    assert client.post(f"/api/runs/{third['id']}/stop").json()["state"] == "cancelled"

    evs = events(client, first["id"])
    kinds = [k for k, _ in evs]
    points = [d for k, d in evs if k == "point"]
    assert kinds[0] == "status" and kinds[-2:] == ["verdict", "end"]
    assert len(points) == 4 * 6  # four runs x six steps, each step as it was written
    assert {p["run"] for p in points} == {"broken-no-aux", "aux-loss", "aux-free-bias", "dense-active"}
    moe = [p for p in points if p["run"] != "dense-active"]
    assert all(len(p["load"]) == 8 and abs(sum(p["load"]) - 1) < 1e-9 for p in moe)
    assert all(p["load"] == [] for p in points if p["run"] == "dense-active")  # no router
    verdict = evs[-2][1]
    on_disk = load_experiment(cfg.runs_dir / first["id"])
    assert verdict["verdicts"] == on_disk["verdicts"] and verdict["passed"] == on_disk["passed"]
    assert client.get(f"/api/runs/{first['id']}").json()["verdict"] == verdict

    # The second starts once the first is done; `moelab report` reads both as lab experiments.
    assert events(client, second["id"])[-1][1]["state"] == "done"
    states = {r["id"]: r["state"] for r in client.get("/api/runs").json()["runs"]}
    assert states == {first["id"]: "done", second["id"]: "done", third["id"]: "cancelled"}
    html = build_report([cfg.runs_dir], tmp_path / "report.html").read_text()
    assert first["id"] in html and "broken-no-aux" in html

    # Compare: every finished run, with its size from moelab.accounting.
    rows = {r["name"]: r for r in client.get("/api/compare").json()["runs"]}
    row = rows[f"{first['id']}/aux-loss"]
    assert row["kind"] == "MoE" and row["finished"] and row["steps"] == 6
    assert len(row["train_curve"]) == 6 and row["val_curve"][0][0] == 0
    counts = count_params(spec_from_moelab_run(cfg.runs_dir / first["id"] / "aux-loss")[0])
    assert (row["total_params"], row["active_params"]) == (counts.total, counts.active)


@pytest.mark.slow
def test_stop_checkpoints_and_resume_finishes(client, served):
    from moelab.rundir import STATE_FILE

    _, cfg = served
    run = client.post("/api/runs", json={"experiment": "collapse", "knobs": {"steps": 400}}).json()
    folder = cfg.runs_dir / run["id"]
    wait_for(lambda: (folder / "broken-no-aux" / "metrics.jsonl").is_file()
             and (folder / "broken-no-aux" / "metrics.jsonl").read_text().count('"train"') >= 2, 60, "training rows")
    assert client.post(f"/api/runs/{run['id']}/stop").json()["state"] == "stopping"
    wait_for(lambda: client.get(f"/api/runs/{run['id']}").json()["state"] == "stopped", 60, "the stop")
    d = client.get(f"/api/runs/{run['id']}").json()
    assert d["resumable"] and d["exit_code"] == 130
    assert (folder / "broken-no-aux" / STATE_FILE).is_file()  # the checkpoint --resume continues from
    assert not (folder / "experiment.json").exists()
    metrics = folder / "broken-no-aux" / "metrics.jsonl"
    before = [json.loads(line) for line in metrics.read_text().splitlines()]
    done = max(r["step"] for r in before if r["kind"] == "train")

    assert client.post(f"/api/runs/{run['id']}/resume").json()["state"] == "queued"
    wait_for(lambda: metrics.read_text().count('"train"') >= done + 2, 60, "training after the resume")
    client.post(f"/api/runs/{run['id']}/stop")  # no need to train 3 x 400 steps here
    wait_for(lambda: client.get(f"/api/runs/{run['id']}").json()["state"] == "stopped", 60, "the second stop")
    after = [json.loads(line) for line in metrics.read_text().splitlines()]
    # Continued, not retrained: the rows up to the checkpoint are the first session's own
    # (a retrained run would have new step times), and the steps go on from there.
    kept = [r for r in after if r["kind"] == "train" and r["step"] <= done]
    assert kept == [r for r in before if r["kind"] == "train" and r["step"] <= done]
    steps = [r["step"] for r in after if r["kind"] == "train"]
    assert steps == list(range(1, len(steps) + 1)) and len(steps) > done


@pytest.mark.slow
@pytest.mark.parametrize("experiment", ["instability", "capacity"])
def test_the_other_experiments_stream_to_their_verdict(client, served, experiment):
    from moelab.lab.failures import load_experiment

    _, cfg = served
    knobs = {"steps": 4} | ({"capacity_factors": [0.5, None]} if experiment == "capacity" else {})
    run = client.post("/api/runs", json={"experiment": experiment, "knobs": knobs}).json()
    evs = events(client, run["id"])
    assert evs[-1][1]["state"] == "done", (cfg.runs_dir / run["id"] / "worker.log").read_text()
    on_disk = load_experiment(cfg.runs_dir / run["id"])
    assert evs[-2] == ("verdict", client.get(f"/api/runs/{run['id']}").json()["verdict"])
    assert evs[-2][1]["verdicts"] == on_disk["verdicts"]
    points = [d for k, d in evs if k == "point"]
    assert {p["run"] for p in points} == set(on_disk["runs"])
    assert all(p["max_router_logit"] is not None for p in points)
    r = client.post(f"/api/runs/{run['id']}/resume")  # done: nothing to resume
    assert r.status_code == 400 and "only a stopped run" in r.json()["error"]["message"]


def _fake_run(folder, moe: bool, val_losses: list[float], every: int = 10):
    """A run directory with a config and hand-written metrics (no weights): what Compare reads."""
    from moelab.model import ModelConfig
    from moelab.moe import MoEConfig
    from moelab.rundir.files import write_run_config

    folder.mkdir(parents=True)
    cfg = ModelConfig(vocab_size=512, d_model=32, n_layers=2, n_heads=2, d_ff=64,
                      moe=MoEConfig(d_model=32, d_expert=32, num_experts=4, top_k=2) if moe else None)
    write_run_config(folder, cfg)
    steps = every * (len(val_losses) - 1)
    rows = [{"kind": "train", "step": s, "loss": 6.0 - s / 100} for s in range(1, steps + 1)]
    rows += [{"kind": "eval", "step": every * i, "val_loss": v} for i, v in enumerate(val_losses)]
    (folder / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return folder


def test_compare_moe_vs_dense(client, served):
    from moelab.train.compare import steps_to_reach

    _, cfg = served
    moe = _fake_run(cfg.runs_dir / "cmp" / "moe", True, [6.0, 5.0, 4.0, 3.5])
    dense = _fake_run(cfg.runs_dir / "cmp" / "dense", False, [6.0, 5.5, 5.0, 4.5])
    rows = {r["name"]: r for r in client.get("/api/compare").json()["runs"]}
    assert rows["cmp/moe"]["kind"] == "MoE" and rows["cmp/dense"]["kind"] == "dense"
    assert rows["cmp/dense"]["total_params"] == rows["cmp/dense"]["active_params"]
    assert rows["cmp/moe"]["val_curve"] == [[0, 6.0], [10, 5.0], [20, 4.0], [30, 3.5]]
    d = client.post("/api/compare/pair", json={"moe": str(moe), "dense": str(dense)}).json()
    expected = steps_to_reach([{"step": 10 * i, "val_loss": v} for i, v in enumerate([6.0, 5.0, 4.0, 3.5])], 4.5)
    assert d["moe_steps_to_dense_loss"] == expected == 15.0
    assert d["moe_steps_to_dense_loss_ratio"] == 0.5
    assert d["sentence"] == "cmp/moe reaches cmp/dense's final val loss (4.5000) at step 15 of 30: 0.50x the steps"
    r = client.post("/api/compare/pair", json={"moe": str(dense), "dense": str(moe)})
    assert r.status_code == 400 and r.json()["error"]["field"] == "moe"
    assert client.post("/api/compare/pair", json={"moe": "/etc", "dense": str(dense)}).status_code == 403
    assert client.post("/api/compare/pair", json={"moe": str(cfg.runs_dir / "nope"), "dense": str(dense)}).status_code == 404
