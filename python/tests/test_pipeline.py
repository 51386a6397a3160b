"""trace, classify, steer and evaluate from Python against the same commands of the CLI."""

import json

import numpy as np

import neurosteer as ns
from conftest import read_safetensors, run_cli

TC = "fixtures/transcoders/stories260K/layer_02/stories260K_blocks.2.ln2.hook_normalized_512.pt"


def test_pipeline_equals_cli(shared, cli, tmp_path):
    model_dir = shared / "assets/stories260K/hf"
    tc_path = shared / TC
    gsm8k = shared / "assets/reasoning/gsm8k/test.jsonl"
    boolq = shared / "assets/boolq/validation.jsonl"
    cli_dir, py_dir = tmp_path / "cli", tmp_path / "py"

    # trace
    run_cli(cli, "trace", "--model", model_dir, "--transcoder", tc_path, "--dataset", gsm8k, "--n", 6,
            "--max-new-tokens", 6, "--batch-size", 4, "--truncate-left", "--out", cli_dir / "traces")
    model = ns.Model.load(str(model_dir))
    manifest = ns.trace(model, str(tc_path), str(gsm8k), py_dir / "traces", n=6, max_new_tokens=6, batch_size=4,
                        truncate_left=True, progress=False)
    assert manifest == json.loads((cli_dir / "traces/trace.json").read_text())
    for style in manifest["styles"]:
        name = style[0]
        a = read_safetensors(cli_dir / "traces" / name / "summary.safetensors")
        b = read_safetensors(py_dir / "traces" / name / "summary.safetensors")
        assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a), name

    # classify
    run_cli(cli, "classify", "--traces", cli_dir / "traces", "--diff-threshold", 1e-4, "--out", cli_dir / "neurons.json")
    neurons = ns.classify(py_dir / "traces", out=py_dir / "neurons.json", diff_threshold=1e-4)
    want = json.loads((cli_dir / "neurons.json").read_text())
    for key in ["reasoning", "memory", "alive", "features", "n_alive", "thresholds", "layer"]:
        assert neurons[key] == want[key], key
    assert (py_dir / "neurons.csv").exists() and (py_dir / "neurons.png").exists()
    assert neurons["reasoning"], "some feature rises under chain of thought"

    # steer, with a Transcoder object and the features as a list
    run_cli(cli, "steer", "--model", model_dir, "--transcoder", tc_path, "--features", cli_dir / "neurons.json",
            "--dataset", boolq, "--n", 6, "--max-new-tokens", 8, "--mode", "replace", "--random-controls", 1,
            "--out", cli_dir / "results.json")
    tc = ns.Transcoder.load(tc_path)
    records = ns.steer(model, tc, py_dir / "neurons.json", str(boolq), out=py_dir / "results.json", n=6,
                       max_new_tokens=8, mode="replace", random_controls=1, progress=False)
    assert records == json.loads((cli_dir / "results.json").read_text())
    assert len(records) == 6 and {"Base", "Strengthen"} <= set(records[0]["generations"])
    listed = ns.steer(model, tc, neurons["reasoning"], str(boolq), out=py_dir / "results-list.json", n=2,
                      max_new_tokens=4, configs="Base,Up=2.0", progress=False)
    assert len(listed) == 2 and set(listed[0]["generations"]) == {"Base", "Up"}

    # evaluate
    run_cli(cli, "evaluate", cli_dir / "results.json", "--out", cli_dir / "evaluation")
    e = ns.evaluate(py_dir / "results.json", out=py_dir / "evaluation")
    assert e == json.loads((cli_dir / "evaluation/evaluation.json").read_text())
    assert {c["name"] for c in e["configs"]} >= {"Base", "Strengthen"}
    assert (py_dir / "evaluation/evaluation.md").exists()


def test_pipeline_option_errors(shared, tmp_path):
    model = ns.Model.load(str(shared / "assets/stories260K/hf"))
    gsm8k = str(shared / "assets/reasoning/gsm8k/test.jsonl")
    try:
        ns.trace(model, str(shared / TC), gsm8k, tmp_path / "t", n=2, max_new_token=3)
    except ns.NeurosteerError as e:
        assert "unknown field `max_new_token`" in str(e)
    else:
        raise AssertionError("a misspelt option was accepted")
    try:
        ns.steer(model, str(shared / TC), [1], gsm8k, out=tmp_path / "r.json", score="vote")
    except ns.NeurosteerError as e:
        assert str(e) == "--score must be generate, loglik or both, not `vote`"
    else:
        raise AssertionError("a bad score was accepted")
