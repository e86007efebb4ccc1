from __future__ import annotations

from types import SimpleNamespace

import pytest

from factories import family_config
from trtc.compiler.families import adapter_for_config, supported_architectures
from trtc.errors import TrtcError


@pytest.mark.parametrize("family,checks", [
    ("llama", {"tie_word_embeddings": True, "rope_type": "llama3", "qkv_bias": False, "sliding_window": None}),
    ("mistral", {"sliding_window": 12, "qkv_bias": False}),
    ("qwen2", {"qkv_bias": True, "qk_norm": False}),
    ("qwen3", {"qk_norm": True, "head_dim": 32, "hidden_size": 64, "num_heads": 4}),
])
def test_spec_per_family(family, checks):
    cfg = family_config(family, vocab_size=100)
    spec = adapter_for_config(cfg).spec_from_config(cfg)
    assert spec.family == family
    for k, v in checks.items():
        assert getattr(spec, k) == v, k


def test_unsupported_architecture_lists_supported():
    with pytest.raises(TrtcError) as e:
        adapter_for_config(SimpleNamespace(architectures=["FalconForCausalLM"], model_type="falcon"))
    for a in supported_architectures():
        assert a in str(e.value)


def test_dynamic_rope_is_refused():
    cfg = family_config("llama", vocab_size=100)
    cfg.rope_parameters = {"rope_type": "dynamic", "rope_theta": 10000.0, "factor": 2.0}
    with pytest.raises(TrtcError, match="dynamic"):
        adapter_for_config(cfg).spec_from_config(cfg)
