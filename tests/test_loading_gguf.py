"""GGUF input (``--model.teacher X.gguf``): header checks that need no real checkpoint."""

import numpy as np
import pytest

from caq_lightning.errors import CAQError
from caq_lightning.loading import gguf_info, load_config, load_model, load_tokenizer

gguf = pytest.importorskip("gguf", reason="GGUF input needs the gguf package (a project dependency): pip install gguf")


def write_gguf(path, arch: str, tensor_type=None):
    """A header-only-sized GGUF: the architecture key and one 32x32 tensor of ``tensor_type`` (None: F32)."""
    writer = gguf.GGUFWriter(str(path), arch)
    data = np.random.default_rng(0).standard_normal((32, 32)).astype(np.float32)
    if tensor_type is None:
        writer.add_tensor("blk.0.attn_q.weight", data)
    else:
        packed = gguf.quants.quantize(data, tensor_type)
        writer.add_tensor("blk.0.attn_q.weight", packed, raw_shape=packed.shape, raw_dtype=tensor_type)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def test_fp_gguf_is_not_quantized(tmp_path):
    assert gguf_info(write_gguf(tmp_path / "m.gguf", "llama")) == ("llama", [])


def test_quantized_gguf_reports_its_types(tmp_path):
    path = write_gguf(tmp_path / "m.gguf", "qwen2", gguf.GGMLQuantizationType.Q8_0)
    assert gguf_info(path) == ("qwen2", ["Q8_0"])


@pytest.mark.parametrize("load", [load_model, load_config, load_tokenizer])
def test_unsupported_gguf_architecture_fails_before_loading(tmp_path, load):
    path = write_gguf(tmp_path / "gpt2.gguf", "gpt2")
    with pytest.raises(CAQError, match="unsupported GGUF architecture 'gpt2'.*supports llama"):
        load(str(path))


def test_missing_gguf_fails(tmp_path):
    with pytest.raises(CAQError, match="does not exist"):
        load_model(str(tmp_path / "nope.gguf"))


def test_not_a_gguf_file_fails(tmp_path):
    path = tmp_path / "fake.gguf"
    path.write_bytes(b"not a gguf file at all" * 10)
    with pytest.raises(CAQError, match="not a readable GGUF"):
        load_model(str(path))
