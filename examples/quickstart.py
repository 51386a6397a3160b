"""neurosteer from Python, notebook style: run each `# %%` cell in turn (VS Code, Jupyter with
jupytext, or `python examples/quickstart.py` at once).

Uses the shared assets: stories260K (a 260K-parameter story model) and a transcoder trained for
its layer 2. Set NEUROSTEER_SHARED if ../shared is not beside the checkout.
"""

# %% Load a model: a Hugging Face folder, a hub id or a llama2.c checkpoint.
import os
from pathlib import Path

import numpy as np

import neurosteer as ns

shared = Path(os.environ.get("NEUROSTEER_SHARED", Path(__file__).resolve().parents[2] / "shared"))
model = ns.Model.load(str(shared / "assets/stories260K/hf"))
print(model.cfg)

# %% Run a prompt and keep hook values (TransformerLens names and values).
prompt = "Once upon a time, there was a little girl named Lily."
tokens = model.to_tokens(prompt)
logits, cache = model.run_with_cache(prompt, names=["blocks.2.ln2.hook_normalized", "blocks.2.hook_mlp_out"])
print(tokens.shape, logits.shape, {k: v.shape for k, v in cache.items()})
print("next token:", repr(model.to_string([int(logits[-1].argmax())])))

# %% Load a transcoder for layer 2 and look at its features on the prompt.
tc = ns.Transcoder.load(shared / "fixtures/transcoders/stories260K/layer_02/stories260K_blocks.2.ln2.hook_normalized_512.pt")
print(tc.cfg)
features = tc.encode(cache["blocks.2.ln2.hook_normalized"])  # [seq, d_sae]
reconstruction = tc.decode(features)  # [seq, d_model], stands for blocks.2.hook_mlp_out
mlp_out = cache["blocks.2.hook_mlp_out"]
fve = 1 - ((mlp_out - reconstruction) ** 2).sum() / ((mlp_out - mlp_out.mean(0)) ** 2).sum()
print(f"L0 {np.count_nonzero(features, axis=1).mean():.1f}, variance explained {fve:.3f}")
top = np.argsort(-features.max(axis=0))[:5]
print("most active features:", top.tolist())

# %% Steer: scale those features while generating, and compare with the untouched model.
base = model.generate(prompt, max_new_tokens=30)
print("base:       ", base["text"])
for strength in [0.0, 8.0]:
    steered = model.generate(prompt, max_new_tokens=30, steer=ns.Steering(tc, top.tolist(), strength=strength))
    print(f"strength {strength}:", steered["text"])

# %% Plot the features' activations over the prompt (when matplotlib is installed).
try:
    import matplotlib.pyplot as plt
except ImportError:
    print("matplotlib is not installed: no plot")
else:
    fig, ax = plt.subplots(figsize=(8, 3))
    for i in top:
        ax.plot(features[:, i], label=f"feature {i}")
    ax.set_xticks(range(len(tokens)), [model.to_string([int(t)]) for t in tokens], rotation=90)
    ax.set_ylabel("activation")
    ax.legend()
    fig.tight_layout()
    fig.savefig("quickstart_features.png")
    print("wrote quickstart_features.png")
