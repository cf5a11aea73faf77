"""Models in and out: loading any model spec (built-in demos, GGUF, directories, the hub),
saving and loading gpconv checkpoints, shrinking a checkpoint by streaming, dense export."""

from .convert import densify_dir
from .load import build_meta, from_pretrained, has_weights, is_gpconv_dir, load_into, load_meta, load_state_, read_config, weight_files
from .models import BYTE_TOKENIZER, DEMO_MODELS, byte_tokenizer, load_config, load_gguf, load_model, load_tokenizer, smollm2_gguf_path, tiny_phi3, tiny_phi3_config
from .save import MODELING_FILE, PLAN_FILE, attach_plan, save_pretrained
from .stream import StreamUnsupported, stream_shrink

__all__ = [
    "BYTE_TOKENIZER", "DEMO_MODELS", "MODELING_FILE", "PLAN_FILE", "StreamUnsupported", "attach_plan", "build_meta",
    "byte_tokenizer", "densify_dir", "from_pretrained", "has_weights", "is_gpconv_dir", "load_config", "load_gguf",
    "load_into", "load_meta", "load_model", "load_state_", "load_tokenizer", "read_config", "save_pretrained",
    "smollm2_gguf_path", "stream_shrink", "tiny_phi3", "tiny_phi3_config", "weight_files",
]
