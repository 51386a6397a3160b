"""Type stubs of neurosteer's Rust extension (``neurosteer._native``)."""

import os
import pathlib
from typing import Any, Dict, List, Literal, Optional, Sequence, Tuple, TypedDict, Union, overload

import numpy as np
import numpy.typing as npt

_Path = Union[str, "os.PathLike[str]"]
_Mode = Literal["delta", "replace", "seed-compat"]

class NeurosteerError(RuntimeError):
    """An error from neurosteer; the message is the one line the command line prints."""

class ModelConfig:
    """A model's shapes and special tokens (``model.cfg``)."""

    source: str
    """Where the model came from (folder, file or hub id)."""
    family: str
    """``"llama"`` or ``"gpt2"``."""
    n_layers: int
    d_model: int
    d_mlp: int
    vocab: int
    """Vocabulary size."""
    n_ctx: int
    """Context length."""
    bos: Optional[int]
    """The BOS id ``to_tokens`` prepends, or None."""
    eos: List[int]
    """Ids that end a generated sequence."""
    device: str
    """``"cpu"`` or ``"cuda:N"``."""
    dtype: str
    """The weights' dtype: ``"f32"``, ``"bf16"`` or ``"f16"``."""
    @property
    def d_vocab(self) -> int:
        """TransformerLens's name for ``vocab``."""

class Generation(TypedDict):
    """One prompt's output, as a line of ``neurosteer generate --json``."""

    prompt: str
    new_tokens: List[int]
    """The new token ids (EOS included when it stopped the sequence)."""
    text: str
    """The new tokens' text."""

class Model:
    """A language model (Llama family, GPT-2, llama2.c) with TransformerLens hook points."""

    @staticmethod
    def load(
        spec: str,
        *,
        device: str = "cpu",
        dtype: Literal["auto", "f32", "bf16", "f16"] = "auto",
        transcoder_dtype: Literal["f32", "model", "bf16", "f16"] = "f32",
        tokenizer: Optional[_Path] = None,
        no_bos: bool = False,
    ) -> "Model":
        """Loads a Hugging Face folder, a hub id or a llama2.c ``.bin`` checkpoint, as ``--model``.

        ``device``: ``"cpu"``, ``"cuda"`` or ``"cuda:N"`` (CUDA builds only). ``dtype``: the weights'
        precision (activations stay f32). ``transcoder_dtype``: the precision of the weight matrices
        of transcoders used to steer it (``"model"``: the model's; encodes sum in f32). ``tokenizer``: a ``tokenizer.json``, or llama2.c's
        ``tok512.bin`` for ``.bin`` checkpoints. ``no_bos``: do not prepend BOS in ``to_tokens``.
        """
    @property
    def cfg(self) -> ModelConfig:
        """Shapes and special tokens."""
    def to_tokens(self, text: str) -> npt.NDArray[np.int64]:
        """Token ids ``[seq]`` of ``text``, BOS first unless loaded with ``no_bos``."""
    def to_string(self, ids: Sequence[int]) -> str:
        """The text of token ids."""
    def run_with_cache(
        self, input: Union[str, Sequence[int]], names: Optional[Sequence[str]] = None
    ) -> Tuple[npt.NDArray[np.float32], Dict[str, npt.NDArray[np.float32]]]:
        """Runs one prompt (text or token ids) and returns ``(logits, cache)``.

        ``logits`` are TransformerLens's logits ``[seq, vocab]`` (raw logits minus their mean
        over the vocabulary, except for Gemma-2, whose TransformerLens logits are not centred); ``cache`` maps each hook name in ``names`` (TransformerLens
        names, e.g. ``"blocks.1.ln2.hook_normalized"``) to its value ``[seq, d]``. Equal, bit
        for bit, to what ``neurosteer activations`` writes.
        """
    @overload
    def generate(
        self,
        prompts: str,
        max_new_tokens: int = 50,
        batch_size: int = 8,
        steer: Union[None, "Steering", Sequence["Steering"]] = None,
        *,
        truncate_left: bool = False,
        ablate_mlp: Sequence[int] = (),
    ) -> Generation: ...
    @overload
    def generate(
        self,
        prompts: Sequence[str],
        max_new_tokens: int = 50,
        batch_size: int = 8,
        steer: Union[None, "Steering", Sequence["Steering"]] = None,
        *,
        truncate_left: bool = False,
        ablate_mlp: Sequence[int] = (),
    ) -> List[Generation]:
        """Greedy generation with a KV cache in left-padded batches, as ``neurosteer generate``.

        A sequence stops at EOS or after ``max_new_tokens``. ``steer``: one or several
        ``Steering`` edits (at most one per layer is meaningful). ``truncate_left``: cut prompts
        that do not fit the context from the left instead of refusing them. ``ablate_mlp``:
        layers whose MLP output is zeroed. One prompt gives one dict, a list gives a list.
        """

class TranscoderConfig:
    """A transcoder's placement and sizes (``tc.cfg``)."""

    layer: int
    hook_in: str
    """Input hook, e.g. ``"blocks.2.ln2.hook_normalized"``."""
    hook_out: str
    """Output hook, e.g. ``"blocks.2.hook_mlp_out"``."""
    d_in: int
    d_sae: int
    d_out: int
    format: str
    """The on-disk format it was read from."""
    model_name: Optional[str]
    activation: Literal["relu", "jump_relu", "jump_relu_non_negative", "top_k"]
    """``jump_relu`` is ``pre·(pre > θ)`` (circuit-tracer, Gemma Scope); ``jump_relu_non_negative``
    is SAELens's ``relu(pre)·(pre > θ)``."""
    k: Optional[int]
    """For ``top_k``: how many features each token keeps."""
    skip: bool
    """Whether it has a skip connection."""
    extra: Dict[str, Any]
    """Other configuration fields of the file."""

class Transcoder:
    """A transcoder: a sparse stand-in for one layer's MLP.

    ``f = act((x - b_dec_in) @ W_enc + b_enc)``, ``y = f @ W_dec + b_dec_out`` (+ skip).
    """

    @staticmethod
    def load(path: _Path, layer: Optional[int] = None) -> "Transcoder":
        """Loads a sae_training ``.pt``, a SAELens folder or a neurosteer ``.safetensors``.

        ``layer``, when given, must be the file's layer.
        """
    @property
    def path(self) -> pathlib.Path:
        """The file or folder it was loaded from."""
    @property
    def cfg(self) -> TranscoderConfig: ...
    @property
    def log_frequency(self) -> Optional[npt.NDArray[np.float32]]:
        """log10 firing frequency per feature ``[d_sae]``, or None when the file has none."""
    def alive(self, threshold: float = -6.0) -> Optional[List[int]]:
        """Features whose log10 frequency is above ``threshold``; None without frequencies."""
    def encode(self, x: npt.ArrayLike) -> npt.NDArray[np.float32]:
        """Feature activations ``[..., d_in] -> [..., d_sae]``."""
    def decode(self, f: npt.ArrayLike) -> npt.NDArray[np.float32]:
        """``f @ W_dec + b_dec_out``: ``[..., d_sae] -> [..., d_out]`` (no skip connection)."""
    def forward(self, x: npt.ArrayLike) -> npt.NDArray[np.float32]:
        """``decode(encode(x))`` plus the skip connection when present."""

class Steering:
    """Scales a transcoder's features while the model generates."""

    def __init__(
        self,
        transcoder: Transcoder,
        features: Union[str, Sequence[int]],
        strength: float,
        mode: _Mode = "delta",
    ) -> None:
        """``features``: indices, or what ``--features`` takes (``"1,5,9"``, a JSON file with a list, or
        a neurons.json file whose ``"reasoning"`` list is used).

        ``mode``: ``delta`` (real MLP output + (s-1)·Σ f_i W_dec[i]; s = 1 is the model),
        ``replace`` (MLP output := transcoder output with the features scaled) or ``seed-compat``
        (the original notebook's hook, for comparisons only).
        """
    @property
    def transcoder(self) -> Transcoder: ...
    @property
    def features(self) -> List[int]: ...
    @property
    def strength(self) -> float: ...
    @property
    def mode(self) -> _Mode: ...
    @property
    def layer(self) -> int: ...

def trace(
    model: Model,
    transcoder: Union[Transcoder, _Path],
    dataset: str,
    out: _Path,
    *,
    progress: Optional[bool] = None,
    split: str = "validation",
    kind: Optional[str] = None,
    question_field: Optional[str] = None,
    answer_field: Optional[str] = None,
    passage_field: Optional[str] = None,
    n: Optional[int] = None,
    seed: int = 42,
    shuffle: bool = True,
    styles: Sequence[str] = ("basic", "0shot", "fewshot"),
    templates: Optional[_Path] = None,
    chat: bool = False,
    max_new_tokens: int = 32,
    batch_size: int = 8,
    truncate_left: bool = False,
) -> Dict[str, Any]:
    """``neurosteer trace``: generates under each prompt style and records every feature at
    each step into the folder ``out`` (resumed when it holds the same trace).

    Returns the trace manifest (``out/trace.json``). ``n=None`` traces every item.
    """

def classify(
    traces: _Path,
    out: _Path = "neurons.json",
    *,
    model: Optional[Model] = None,
    transcoder: Optional[Union[Transcoder, _Path]] = None,
    frequency: Optional[_Path] = None,
    alive_threshold: float = -6.0,
    diff_threshold: float = 1e-3,
    statistic: Literal["mean", "first", "last"] = "mean",
    select: str = "threshold",
    inject: Optional[Dict[str, Any]] = None,
) -> Dict[str, Any]:
    """``neurosteer classify``: splits alive features into reasoning and memory features.

    ``select`` is ``"threshold"`` (the original rule), ``"fdr:Q"`` or ``"top:K"``. ``inject``
    (keys ``top_tokens``, ``threshold``, ``text``, ``n_texts``, as ``[classify.inject]`` in a
    ``run`` config) runs the token-injection control and needs ``model`` and ``transcoder``.

    Writes ``out`` (plus a CSV and plots beside it) and returns its content; ``"features"`` is
    a list of per-feature records.
    """

def steer(
    model: Model,
    transcoder: Union[Transcoder, _Path],
    features: Union[str, Sequence[int]],
    dataset: str,
    out: _Path = "results.json",
    *,
    progress: Optional[bool] = None,
    split: str = "validation",
    kind: Optional[str] = None,
    question_field: Optional[str] = None,
    answer_field: Optional[str] = None,
    passage_field: Optional[str] = None,
    n: Optional[int] = None,
    seed: int = 42,
    shuffle: bool = True,
    template: str = ...,
    configs: str = ...,
    mode: _Mode = "delta",
    max_new_tokens: int = 50,
    batch_size: int = 8,
    random_controls: int = 0,
    score: Literal["generate", "loglik", "both"] = "generate",
) -> List[Dict[str, Any]]:
    """``neurosteer steer``: answers the dataset's questions under each steering configuration.

    Writes ``out`` (resumed when it holds the same run) and returns its records, one per item.
    ``features``: indices, or a neurons.json path, ``"1,5,9"`` or a JSON file with a list. ``n=None`` answers
    every item.
    """

def evaluate(results: _Path, out: _Path = "evaluation", neurons: Optional[_Path] = None) -> Dict[str, Any]:
    """``neurosteer evaluate``: accuracy, bootstrap CIs, McNemar tests, the random controls'
    distribution and flips of a results file; writes ``evaluation.{json,md,csv}``, the plots
    and ``report.html`` into ``out`` (``neurons``: the classification the report describes)
    and returns the evaluation."""
