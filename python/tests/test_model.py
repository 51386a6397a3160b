"""Model, Transcoder and Steering against the command line and the fixtures' references."""

import json
import shutil
import threading
import time

import numpy as np
import pytest

import neurosteer as ns
from conftest import cli_error, read_safetensors, run_cli

TC_STORIES = "fixtures/transcoders/stories260K/layer_02/stories260K_blocks.2.ln2.hook_normalized_512.pt"
TC_STORIES_L0 = "fixtures/transcoders/stories260K/layer_00/stories260K_blocks.0.ln2.hook_normalized_512.pt"
TC_GPT2 = "fixtures/transcoders/tiny-gpt2/layer_01/tiny-gpt2_blocks.1.ln2.hook_normalized_256.pt"

# (model, extra CLI/load arguments, a transcoder for it or None)
MODELS = {
    "tiny-gpt2": ("fixtures/tiny-gpt2", None, TC_GPT2),
    "tiny-llama3": ("fixtures/tiny-llama3", None, None),
    "stories260K-hf": ("assets/stories260K/hf", None, TC_STORIES),
    "stories260K-bin": ("assets/stories260K/stories260K.bin", "assets/stories260K/tok512.bin", TC_STORIES),
}


def load(shared, name):
    spec, tok, _ = MODELS[name]
    return ns.Model.load(str(shared / spec), tokenizer=(shared / tok) if tok else None)


def model_args(shared, name):
    spec, tok, _ = MODELS[name]
    return ["--model", shared / spec] + (["--tokenizer", shared / tok] if tok else [])


@pytest.mark.parametrize("name", list(MODELS))
def test_run_with_cache_equals_cli_activations(shared, cli, tmp_path, name):
    model = load(shared, name)
    layer = model.cfg.n_layers - 1
    hooks = ["hook_embed", "blocks.0.hook_resid_pre", f"blocks.{layer}.ln2.hook_normalized",
             f"blocks.{layer}.mlp.hook_post", f"blocks.{layer}.hook_mlp_out", "ln_final.hook_normalized"]
    prompt = "Once upon a time, there was a little girl named Lily."
    out = tmp_path / "acts.safetensors"
    tc_path = MODELS[name][2]
    extra = ["--transcoder", shared / tc_path] if tc_path else []
    run_cli(cli, "activations", *model_args(shared, name), "--prompt", prompt,
            *[a for h in hooks for a in ("--hook", h)], *extra, "--out", out)
    want = read_safetensors(out)

    logits, cache = model.run_with_cache(prompt, names=hooks)
    assert logits.dtype == np.float32 and logits.shape == want["logits"].shape
    assert np.array_equal(logits, want["logits"])
    assert set(cache) == set(hooks)
    for h in hooks:
        assert cache[h].shape == want[h].shape, h
        assert np.array_equal(cache[h], want[h]), h
    assert np.array_equal(model.to_tokens(prompt), want["tokens"])
    # Token ids in give the same as the text.
    logits2, _ = model.run_with_cache(model.to_tokens(prompt).tolist())
    assert np.array_equal(logits2, logits)
    if tc_path:
        tc = ns.Transcoder.load(shared / tc_path)
        l = tc.cfg.layer
        _, c = model.run_with_cache(prompt, names=[f"blocks.{l}.ln2.hook_normalized"])
        feats = tc.encode(c[f"blocks.{l}.ln2.hook_normalized"])
        assert np.array_equal(feats, want[f"features.{l}"])


def test_hooks_match_transformer_lens(shared):
    ref = json.loads((shared / "fixtures/tiny-gpt2/reference.json").read_text())
    tl = ref["transformer_lens_hooks"]
    want = read_safetensors(shared / "fixtures/tiny-gpt2" / tl["file"])
    model = ns.Model.load(str(shared / "fixtures/tiny-gpt2"))
    names = [n for n in tl["tensors"] if n.startswith("blocks.")]
    assert model.to_tokens(tl["prompt"]).tolist() == tl["input_ids"]
    logits, cache = model.run_with_cache(tl["prompt"], names=names)
    for n in names:
        assert np.abs(cache[n] - want[n]).max() < 1e-4, n
    assert np.abs(logits[-1] - want["tl.logits_final"]).max() < 1e-4


def test_cfg_and_tokens(shared):
    model = load(shared, "stories260K-hf")
    cfg = model.cfg
    assert (cfg.family, cfg.n_layers, cfg.d_model, cfg.vocab, cfg.d_vocab) == ("llama", 5, 64, 512, 512)
    assert cfg.n_ctx == 512 and cfg.d_mlp > 0 and cfg.device == "cpu" and cfg.dtype == "f32"
    ids = model.to_tokens("Once upon a time")
    assert ids.dtype == np.int64 and ids[0] == cfg.bos
    assert model.to_string(ids[1:]) == "Once upon a time"
    assert ns.Model.load(str(shared / MODELS["stories260K-hf"][0]), no_bos=True).to_tokens("Once").tolist() == ids[1:2].tolist()


PROMPTS = ["Once upon a time", "The little dog", "Lily wanted to play with her friend, but"]


@pytest.mark.parametrize("mode", ["delta", "replace", "seed-compat"])
def test_generate_with_steering_equals_cli(shared, cli, tmp_path, mode):
    model = load(shared, "stories260K-hf")
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps(p) + "\n" for p in PROMPTS))
    features, strength = "3,17,42,100,311", 4.0
    p = run_cli(cli, "generate", *model_args(shared, "stories260K-hf"), "--prompts", prompts, "--max-new-tokens", 24,
                "--batch-size", 2, "--json", "--transcoder", shared / TC_STORIES, "--features", features,
                "--strength", strength, "--mode", mode)
    want = [json.loads(l) for l in p.stdout.splitlines()]
    tc = ns.Transcoder.load(shared / TC_STORIES)
    got = model.generate(PROMPTS, max_new_tokens=24, batch_size=2, steer=ns.Steering(tc, features, strength, mode=mode))
    assert got == want
    base = model.generate(PROMPTS, max_new_tokens=24, batch_size=2)
    assert [g["new_tokens"] for g in got] != [b["new_tokens"] for b in base], "steering changed nothing"


def test_transcoder_dtype_equals_cli(shared, cli, tmp_path, capfd):
    """A model loaded with transcoder_dtype="bf16" steers as `generate --transcoder-dtype bf16`,
    and a Transcoder object is converted once, however often it is used."""
    spec, tok, _ = MODELS["stories260K-hf"]
    model = ns.Model.load(str(shared / spec), tokenizer=(shared / tok) if tok else None, transcoder_dtype="bf16")
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps(p) + "\n" for p in PROMPTS))
    p = run_cli(cli, "generate", *model_args(shared, "stories260K-hf"), "--prompts", prompts, "--max-new-tokens", 16,
                "--json", "--transcoder", shared / TC_STORIES, "--features", "3,17,42,100,311", "--strength", 4.0,
                "--transcoder-dtype", "bf16")
    want = [json.loads(l) for l in p.stdout.splitlines()]
    steering = ns.Steering(ns.Transcoder.load(shared / TC_STORIES), [3, 17, 42, 100, 311], 4.0)
    capfd.readouterr()
    got = model.generate(PROMPTS, max_new_tokens=16, steer=steering)
    assert got == want
    assert model.generate(PROMPTS, max_new_tokens=16, steer=steering) == want
    assert capfd.readouterr().err.count("held in bf16") == 1
    with pytest.raises(ns.NeurosteerError, match="transcoder_dtype"):
        ns.Model.load(str(shared / spec), transcoder_dtype="f8")


def test_placed_replace_steering_is_built_once(shared, cli, tmp_path):
    """Replace steering with a cross-layer transcoder held in bf16 equals the command line, and
    its edit (which reads every source layer from disk) is built once: a second generate still
    works once the files are gone."""
    folder = tmp_path / "clt"
    shutil.copytree(shared / "fixtures/transcoders/circuit-tracer-clt", folder)
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps(p) + "\n" for p in PROMPTS))
    p = run_cli(cli, "generate", "--model", shared / "fixtures/tiny-llama3", "--prompts", prompts, "--max-new-tokens", 8,
                "--json", "--transcoder", folder, "--layer", 1, "--features", "1,2,3,5,8", "--strength", 3.0,
                "--mode", "replace", "--transcoder-dtype", "bf16")
    want = [json.loads(l) for l in p.stdout.splitlines()]
    model = ns.Model.load(str(shared / "fixtures/tiny-llama3"), transcoder_dtype="bf16")
    steering = ns.Steering(ns.Transcoder.load(folder, layer=1), [1, 2, 3, 5, 8], 3.0, mode="replace")
    assert model.generate(PROMPTS, max_new_tokens=8, steer=steering) == want
    shutil.rmtree(folder)
    assert model.generate(PROMPTS, max_new_tokens=8, steer=steering) == want


def test_generate_two_layers_and_single_prompt(shared, cli):
    model = load(shared, "stories260K-hf")
    p = run_cli(cli, "generate", *model_args(shared, "stories260K-hf"), "--prompt", PROMPTS[0], "--max-new-tokens", 20,
                "--json", "--transcoder", shared / TC_STORIES_L0, "--features", "1,2,3", "--strength", 3.0,
                "--transcoder", shared / TC_STORIES, "--features", "5,6", "--strength", 0.0, "--ablate-mlp", 4)
    want = json.loads(p.stdout)
    steer = [ns.Steering(ns.Transcoder.load(shared / TC_STORIES_L0), [1, 2, 3], 3.0),
             ns.Steering(ns.Transcoder.load(shared / TC_STORIES), [5, 6], 0.0)]
    got = model.generate(PROMPTS[0], max_new_tokens=20, steer=steer, ablate_mlp=[4])
    assert got == want


def test_transcoder(shared):
    tc = ns.Transcoder.load(shared / TC_STORIES, layer=2)
    cfg = tc.cfg
    assert (cfg.layer, cfg.d_in, cfg.d_sae, cfg.d_out) == (2, 64, 512, 64)
    assert cfg.hook_in == "blocks.2.ln2.hook_normalized" and cfg.hook_out == "blocks.2.hook_mlp_out"
    assert cfg.format == "sae_training" and cfg.activation == "relu" and isinstance(cfg.extra, dict)
    assert tc.log_frequency.shape == (512,) and tc.log_frequency.dtype == np.float32
    assert tc.alive() == [i for i, v in enumerate(tc.log_frequency) if v > -6.0]
    x = np.random.default_rng(0).standard_normal((2, 3, 64))
    f = tc.encode(x)  # float64 in: converted
    assert f.shape == (2, 3, 512) and f.dtype == np.float32 and (f >= 0).all()
    assert np.array_equal(f[1], tc.encode(x[1].astype(np.float32)))
    assert np.array_equal(tc.encode(np.asfortranarray(x[0])), tc.encode(np.ascontiguousarray(x[0])))
    assert tc.decode(f).shape == (2, 3, 64)
    assert np.array_equal(tc.forward(x), tc.decode(f))  # no skip connection
    saelens = ns.Transcoder.load(shared / "fixtures/transcoders/stories260K/layer_02/saelens")
    assert saelens.cfg.format == "saelens" and saelens.cfg.d_sae == 512


def test_errors_are_exceptions_with_the_cli_message(shared, cli):
    model = load(shared, "stories260K-hf")
    args = model_args(shared, "stories260K-hf")
    with pytest.raises(ns.NeurosteerError) as e:
        model.run_with_cache("hi", names=["blocks.9.hook_mlp_out"])
    assert str(e.value) == cli_error(cli, "activations", *args, "--prompt", "hi", "--hook", "blocks.9.hook_mlp_out", "--out", "/tmp/x")
    with pytest.raises(ns.NeurosteerError) as e:
        model.run_with_cache("hi", names=["blocks.0.hook_nonsense"])
    assert "unknown hook point `blocks.0.hook_nonsense`" in str(e.value)
    missing = shared / "no-such-model"
    with pytest.raises(ns.NeurosteerError) as e:
        ns.Model.load(str(missing))
    assert str(e.value) == cli_error(cli, "generate", "--model", missing, "--prompt", "x")
    assert isinstance(e.value, RuntimeError)
    with pytest.raises(ns.NeurosteerError, match="dtype `f8`: expected one of auto, f32, bf16, f16"):
        ns.Model.load(str(missing), dtype="f8")
    tc = ns.Transcoder.load(shared / TC_STORIES)
    with pytest.raises(ns.NeurosteerError) as e:
        ns.Steering(tc, [600], 2.0)
    # The CLI names the flag the list came from.
    assert cli_error(cli, "generate", *args, "--prompt", "x", "--transcoder", shared / TC_STORIES, "--features", "600") == f"--features 600: {e.value}"
    with pytest.raises(ns.NeurosteerError, match="mode `up`"):
        ns.Steering(tc, [1], 2.0, mode="up")
    with pytest.raises(ns.NeurosteerError, match="--layer 3, but this transcoder is for layer 2"):
        ns.Transcoder.load(shared / TC_STORIES, layer=3)
    with pytest.raises(ns.NeurosteerError) as e:
        model.generate("x" * 3000, max_new_tokens=5)
    assert str(e.value) == cli_error(cli, "generate", *args, "--prompt", "x" * 3000, "--max-new-tokens", 5)
    gpt2 = load(shared, "tiny-gpt2")
    with pytest.raises(ns.NeurosteerError, match="do not match the model's width|hook"):
        gpt2.generate("x", steer=ns.Steering(tc, [1], 2.0))
    with pytest.raises(ns.NeurosteerError):
        tc.encode(np.zeros((3, 5)))
    # Still usable after the errors.
    assert model.generate("Once", max_new_tokens=3)["new_tokens"]


def test_generate_releases_the_gil(shared):
    model = load(shared, "stories260K-hf")
    done = threading.Event()
    result = {}

    def work():
        result["out"] = model.generate(PROMPTS * 8, max_new_tokens=200, batch_size=4)
        done.set()

    t = threading.Thread(target=work)
    ticks = 0
    start = time.perf_counter()
    t.start()
    while not done.is_set():
        ticks += 1
        time.sleep(0.001)
    t.join()
    elapsed = time.perf_counter() - start
    assert len(result["out"]) == 24
    # With the GIL held for the whole generate, this loop would have run about once.
    assert elapsed > 0.2, f"generate was too quick ({elapsed:.3f} s) to tell"
    assert ticks > 50, f"the main thread ran only {ticks} times in {elapsed:.2f} s"


def test_public_transcoder_sets(shared):
    """A circuit-tracer TopK set (one layer chosen with `layer`) and a cross-layer transcoder read
    through Transcoder.load give the fixtures' reference features at every position."""
    model = ns.Model.load(str(shared / "fixtures/tiny-llama3"))
    for folder, layer in [("circuit-tracer-topk", 1), ("circuit-tracer-clt", 2), ("circuit-tracer-relu-skip", 1)]:
        ref_dir = shared / "fixtures/transcoders" / folder
        ref = json.loads((ref_dir / "reference.json").read_text())
        arrays = read_safetensors(ref_dir / "reference_features.safetensors")
        tc = ns.Transcoder.load(ref_dir, layer=layer)
        assert tc.cfg.layer == layer
        for p in ref["prompts"]:
            _, cache = model.run_with_cache(p["text"], names=[tc.cfg.hook_in])
            got = tc.encode(cache[tc.cfg.hook_in])
            want = arrays[p["features"][str(layer)]]
            assert np.abs(got - want).max() / max(1.0, np.abs(want).max()) <= 1e-4, (folder, p["name"])
    topk = ns.Transcoder.load(shared / "fixtures/transcoders/circuit-tracer-topk", layer=1)
    assert topk.cfg.activation == "top_k" and topk.cfg.k == 16 and topk.cfg.hook_in == "blocks.1.mlp.hook_in"
