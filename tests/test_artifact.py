"""The artifact contract (trtc/artifact.py): typed configs read back with field-level errors,
format versions refused clearly, the shipped JSON Schema in step with the code and accepting what
`trtc build` writes."""

from __future__ import annotations

import json
import shutil

import pytest
from click.testing import CliRunner

from trtc import artifact as art
from trtc.cli import main
from trtc.errors import TrtcError


def _edit(d, fn):
    cfg = json.loads((d / art.ENGINE_CONFIG).read_text())
    fn(cfg)
    (d / art.ENGINE_CONFIG).write_text(json.dumps(cfg))


@pytest.fixture()
def engine_copy(tmp_path, tiny_engine):
    d = tmp_path / "engine"
    shutil.copytree(tiny_engine("llama"), d)
    return d


def test_round_trip_is_exact(engine_copy):
    cfg = art.read_engine_config(engine_copy)
    before = (engine_copy / art.ENGINE_CONFIG).read_text()
    art.write_config(engine_copy, cfg)
    assert (engine_copy / art.ENGINE_CONFIG).read_text() == before
    assert cfg.engine_for(0, 89).file == "rank0.engine" and cfg.engine_for(0, 120) is None
    assert cfg.rank_graph(0).data == "rank0.onnx.data"


@pytest.mark.parametrize("edit,needles", [
    (lambda c: c["build_config"].update(max_batch_size="8"), ["field `build_config.max_batch_size`", "must be int"]),
    (lambda c: c["pretrained_config"].pop("num_kv_heads"), ["field `pretrained_config.num_kv_heads`", "is missing"]),
    (lambda c: c.update(shiny_new_field=1), ["field `shiny_new_field`", "not a field this trtc knows"]),
    (lambda c: c["engines"][0].update(rank=3), ["no engine for rank 0"]),
    (lambda c: c["export_config"].update(dtype="float8"), ["`export_config`", "dtype 'float8' is not supported"]),
])
def test_bad_field_names_field_and_file(engine_copy, edit, needles):
    _edit(engine_copy, edit)
    with pytest.raises(TrtcError) as e:
        art.read_engine_config(engine_copy)
    msg = str(e.value)
    assert str(engine_copy / art.ENGINE_CONFIG) in msg
    for n in needles:
        assert n in msg, msg


@pytest.mark.parametrize("version,needle", [(art.FORMAT_VERSION + 1, "newer than this trtc understands"),
                                            (1, "older trtc format"), (None, "older trtc format")])
def test_format_versions(engine_copy, version, needle):
    _edit(engine_copy, lambda c: c.update(format_version=version))
    res = CliRunner().invoke(main, ["inspect", str(engine_copy)])
    assert res.exit_code == 2 and needle in res.output, res.output


def test_shipped_schema_is_generated_from_the_contract():
    from trtc.bundled import read_text

    assert json.loads(read_text(art.SCHEMA_FILE)) == art.engine_config_schema(), \
        "trtc/data/engine-config.schema.json is stale: regenerate it from trtc.artifact.engine_config_schema()"
    res = CliRunner().invoke(main, ["schema"])
    assert res.exit_code == 0 and json.loads(res.stdout)["properties"]["format_version"] == {"const": art.FORMAT_VERSION}


def test_built_config_validates_against_the_schema(engine_copy):
    import jsonschema

    schema = art.engine_config_schema()
    cfg = json.loads((engine_copy / art.ENGINE_CONFIG).read_text())
    jsonschema.validate(cfg, schema)
    cfg["mapping"]["tp_size"] = "2"
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(cfg, schema)


def test_kv_block_arithmetic():
    assert art.blocks_for(0, 16) == 0 and art.blocks_for(1, 16) == 1 and art.blocks_for(16, 16) == 1
    assert art.blocks_for(17, 16) == 2 and art.max_blocks(96, 32) == 3
    assert art.pool_shape(5, 2, 16, 64) == (5, 2, 2, 16, 64)
    assert art.cache_names(1) == [("past_key_values.0.key", "present.0.key"),
                                  ("past_key_values.0.value", "present.0.value")]
