"""YAML configs: defaults, overrides, round trips, and one-sentence errors."""

import dataclasses
import glob
import os
from pathlib import Path

import pytest
import yaml

from lite_tp_jax.models.config import ModelConfig
from lite_tp_jax.run.config import SECTIONS, CheckpointConfig, Config, ConfigError, DataConfig, MeshConfig, TrainConfig
from lite_tp_jax.run.config_file import config_to_dict, dump_config, load_config, parse_config

REPO = Path(__file__).resolve().parents[1]
CONFIG_FILES = sorted(glob.glob(str(REPO / "configs" / "*.yaml")))


def write(tmp_path, text: str, name: str = "config.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


# -- defaults and round trips ------------------------------------------------


def test_empty_mapping_gives_defaults():
    config = parse_config({})
    assert config == Config()
    assert config.model == ModelConfig()
    assert config.mesh == MeshConfig(data=1, pipeline=1, expert=1, tensor=1)
    assert config.train == TrainConfig()
    assert config.train.lr == 3e-3 and config.train.steps == 100
    assert config.data == DataConfig(source="stdlib", path=None)
    assert config.checkpoint == CheckpointConfig(every=50, keep=2)
    assert list(SECTIONS) == ["model", "mesh", "train", "data", "checkpoint", "rollback", "fault", "logging", "compile"]


def test_configs_are_frozen():
    config = parse_config({})
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.train.steps = 3  # type: ignore[misc]


def test_missing_keys_take_defaults(tmp_path):
    path = write(tmp_path, "model:\n  hidden_size: 128\ntrain:\nmesh: {tensor: 4}\n")
    config = load_config(path)
    assert config.model == dataclasses.replace(ModelConfig(), hidden_size=128)
    assert config.train == TrainConfig()
    assert config.mesh == MeshConfig(tensor=4)


def test_an_empty_file_is_refused_and_an_empty_mapping_gives_defaults(tmp_path):
    """An empty config file is a mistake (it would train 100 steps of defaults
    without a word); the defaults stay one call away in code."""
    with pytest.raises(ConfigError, match="is empty; give at least one section"):
        load_config(write(tmp_path, "# nothing here\n"))
    assert parse_config({}) == Config()


def test_round_trip(tmp_path):
    config = parse_config(
        {
            "model": {"vocab_size": 1000, "head_dim": 32, "rope_theta": 5e5, "tie_embeddings": True,
                      "remat": "selective", "norm_eps": 1e-6},
            "mesh": {"data": -1, "tensor": 4},
            "train": {"lr": 3e-5, "min_lr_ratio": 0.0, "seed": 7},
            "data": {"source": "text", "path": "some/dir"},
            "checkpoint": {"every": 5, "keep": 1},
        }
    )
    path = tmp_path / "sub" / "dumped.yaml"
    dump_config(config, path)
    assert load_config(path) == config
    assert yaml.safe_load(path.read_text()) == config_to_dict(config)
    assert [p.name for p in path.parent.iterdir()] == ["dumped.yaml"]  # no temp file left
    # Overwriting is atomic and leaves the new contents.
    dump_config(Config(), path)
    assert load_config(path) == Config()


def test_config_to_dict_is_plain_and_ordered():
    d = config_to_dict(Config())
    assert list(d) == list(SECTIONS)
    assert d["train"]["lr"] == 3e-3
    assert list(d["model"]) == [f.name for f in dataclasses.fields(ModelConfig)]
    assert parse_config(d) == Config()


def test_float_fields_accept_ints_and_exponent_strings(tmp_path):
    # PyYAML reads 1e-3 (no dot) as a string; float fields still take it.
    path = write(tmp_path, "train:\n  lr: 1e-3\n  weight_decay: 0\nmodel:\n  rope_theta: 500000\n")
    config = load_config(path)
    assert config.train.lr == 1e-3 and isinstance(config.train.lr, float)
    assert config.train.weight_decay == 0.0 and isinstance(config.train.weight_decay, float)
    assert config.model.rope_theta == 500000.0 and isinstance(config.model.rope_theta, float)


# -- overrides -----------------------------------------------------------------


def test_overrides_of_each_type(tmp_path):
    path = write(tmp_path, "model:\n  head_dim: 16\n")
    config = load_config(
        path,
        [
            "train.steps=4",  # int
            "train.lr=1e-3",  # float written without a dot
            "train.b2=0.99",  # float
            "train.weight_decay=0",  # float from an int
            "model.tie_embeddings=true",  # bool
            "model.head_dim=null",  # int | None
            "model.remat=full",  # Literal
            "mesh.data=-1",  # the inferred axis
            "data.source=text",  # Literal
            "data.path=2024",  # str | None: the text as written, not the integer
        ],
    )
    assert config.train.steps == 4
    assert config.train.lr == 1e-3
    assert config.train.b2 == 0.99
    assert config.train.weight_decay == 0.0
    assert config.model.tie_embeddings is True
    assert config.model.head_dim is None
    assert config.model.remat == "full"
    assert config.mesh.data == -1
    assert config.data == DataConfig(source="text", path="2024")


def test_overrides_apply_to_mapping_and_later_ones_win():
    config = parse_config({"train": {"steps": 10}}, ["train.steps=20", "train.steps=30", "checkpoint.keep=5"])
    assert config.train.steps == 30
    assert config.checkpoint.keep == 5
    assert parse_config({}, "train.seed=3").train.seed == 3  # a lone string is one override


def test_override_string_values_keep_quotes_semantics():
    config = parse_config({}, ["data.source=tokens", "data.path='my file.npy'"])
    assert config.data.path == "my file.npy"
    assert parse_config({}, ["data.source=text", "data.path=a=b.txt"]).data.path == "a=b.txt"


def test_overrides_do_not_mutate_the_mapping():
    mapping = {"train": {"steps": 10}}
    parse_config(mapping, ["train.steps=20", "model.hidden_size=32"])
    assert mapping == {"train": {"steps": 10}}


# -- errors --------------------------------------------------------------------


@pytest.mark.parametrize(
    "mapping, overrides, message",
    [
        (
            {"model": {"hiden_size": 3}},
            (),
            r"^unknown key 'model\.hiden_size'; allowed keys in 'model': vocab_size, hidden_size, "
            r"num_layers, .*virtual_stages, ",
        ),
        ({}, ["model.hiden_size=3"], r"^unknown key 'model\.hiden_size'; allowed keys in 'model': "),
        ({"modle": {}}, (), r"^unknown section 'modle'; allowed: model, mesh, train, data, checkpoint, rollback, fault, logging, compile$"),
        ({}, ["modle.hidden_size=3"], r"^unknown section 'modle'; allowed: model, mesh, train, data, checkpoint, rollback, fault, logging, compile$"),
        ({"model": {"remat": "some"}}, (), r"^'model\.remat' must be one of none, full, selective, got 'some'$"),
        ({}, ["train.steps=-3"], r"^'train\.steps' must be an integer >= 1, got -3$"),
        ({}, ["mesh.tensor=x"], r"^'mesh\.tensor' must be an integer >= 1 \(or -1\), got 'x'$"),
        ({"mesh": {"tensor": 0}}, (), r"^'mesh\.tensor' must be an integer >= 1 \(or -1\), got 0$"),
        ({"mesh": {"data": -2}}, (), r"^'mesh\.data' must be an integer >= 1 \(or -1\), got -2$"),
        ({}, ["train.steps"], r"^override 'train\.steps' must look like KEY=VALUE"),
        ({}, ["steps=3"], r"^override 'steps=3' must look like KEY=VALUE with KEY as section\.key"),
        ({}, ["train.steps.x=3"], r"^override 'train\.steps\.x=3' must look like KEY=VALUE"),
        ({}, ["train.steps=[1"], r"^override 'train\.steps=\[1' has a value that is not valid YAML$"),
        # bool fields reject ints and strings
        ({"model": {"tie_embeddings": 1}}, (), r"^'model\.tie_embeddings' must be true or false, got 1$"),
        ({}, ["model.tie_embeddings=yes please"], r"^'model\.tie_embeddings' must be true or false, got 'yes please'$"),
        # int fields reject bools and floats
        ({"train": {"steps": True}}, (), r"^'train\.steps' must be an integer >= 1, got true$"),
        ({}, ["train.global_batch=8.0"], r"^'train\.global_batch' must be an integer >= 1, got 8\.0$"),
        ({}, ["train.seq_len=0"], r"^'train\.seq_len' must be an integer >= 1, got 0$"),
        ({}, ["model.num_layers=null"], r"^'model\.num_layers' must be an integer >= 1, got null$"),
        # int | None
        ({}, ["model.head_dim=0"], r"^'model\.head_dim' must be an integer >= 1 or null, got 0$"),
        ({}, ["model.head_dim=abc"], r"^'model\.head_dim' must be an integer >= 1 or null, got 'abc'$"),
        # floats and their ranges
        ({}, ["train.lr=-1e-3"], r"^'train\.lr' must be a number >= 0, got -0\.001$"),
        ({}, ["train.lr=fast"], r"^'train\.lr' must be a number >= 0, got 'fast'$"),
        ({}, ["train.lr=.inf"], r"^'train\.lr' must be a number >= 0, got inf$"),
        ({}, ["train.lr=true"], r"^'train\.lr' must be a number >= 0, got true$"),
        ({}, ["train.min_lr_ratio=1.5"], r"^'train\.min_lr_ratio' must be a number between 0 and 1, got 1\.5$"),
        ({}, ["train.warmup_steps=-1"], r"^'train\.warmup_steps' must be an integer >= 0, got -1$"),
        ({}, ["train.grad_clip=0"], r"^'train\.grad_clip' must be a number > 0, got 0$"),
        ({}, ["train.b2=1"], r"^'train\.b2' must be a number >= 0 and < 1, got 1$"),
        ({}, ["checkpoint.every=0"], r"^'checkpoint\.every' must be an integer >= 1, got 0$"),
        ({}, ["checkpoint.keep=0"], r"^'checkpoint\.keep' must be an integer >= 1, got 0$"),
        ({}, ["data.source=web"], r"^'data\.source' must be one of stdlib, text, tokens, tokenized, got 'web'$"),
        # tokenized corpora, mixtures, packing, sliding windows
        ({}, ["data.source=tokenized"], r"^'data\.path' is required when 'data\.source' is 'tokenized' \(a corpus directory"),
        ({}, ["data.sources=[{path: a, weight: 0}, {path: b, weight: 0}]", "data.source=tokenized"],
         r"^'data\.sources\[0\]\.weight' must be > 0, got 0\.0 \(the weights sum to 0\)$"),
        ({}, ["data.sources=[{path: a, weight: 2}, {path: b, weight: -1}]", "data.source=tokenized"],
         r"^'data\.sources\[1\]\.weight' must be > 0, got -1\.0$"),
        ({}, ["data.sources=[{path: a, weight: 2}, {path: b, weight: 0}]", "data.source=tokenized"],
         r"^'data\.sources\[1\]\.weight' must be > 0, got 0\.0; remove a source rather than weigh it 0$"),
        ({}, ["data.sources=[{path: a, weight: 1}]"],
         r"^'data\.sources' is a mixture of tokenized corpora: set data\.source=tokenized and data\.path=null"),
        ({}, ["data.sources=[{path: a}]"], r"^'data\.sources' must be a list of \{path: <corpus directory>, weight: <number>\} mappings"),
        ({}, ["data.sources=[{path: a, weight: x}]"], r"^'data\.sources' must be a list of \{path"),
        ({}, ["data.sources=a.bin"], r"^'data\.sources' must be a list of \{path"),
        ({}, ["data.packing=maybe"], r"^'data\.packing' must be true or false, got 'maybe'$"),
        ({}, ["model.sliding_window=0"], r"^'model\.sliding_window' must be an integer >= 1 or null, got 0$"),
        ({}, ["model.sliding_window=-4096"], r"^'model\.sliding_window' must be an integer >= 1 or null, got -4096$"),
        # sections that are not mappings
        ({"train": [1, 2]}, (), r"^section 'train' must be a mapping of keys to values, got \[1, 2\]$"),
        ({"train": 5}, ["train.steps=3"], r"^section 'train' must be a mapping of keys to values, got 5$"),
        # cross-field rules
        (
            {"model": {"num_heads": 6, "num_kv_heads": 4, "hidden_size": 96}},
            (),
            r"^'model\.num_heads' \(6\) must be a multiple of 'model\.num_kv_heads' \(4\): each kv head serves a whole group",
        ),
        (
            {"model": {"num_heads": 5, "num_kv_heads": 5}},
            (),
            r"^'model\.hidden_size' \(64\) must be a multiple of 'model\.num_heads' \(5\) while 'model\.head_dim' is null",
        ),
        (
            {"model": {"moe_every": 1, "num_experts": 4, "top_k": 5}},
            (),
            r"^'model\.top_k' \(5\) must be at most 'model\.num_experts' \(4\): each token picks top_k distinct experts$",
        ),
        (
            {},
            ["model.shared_expert_gate=true"],
            r"^'model\.shared_expert_gate' needs a shared expert: set 'model\.shared_expert_size' > 0$",
        ),
        ({}, ["model.router_scoring=tanh"], r"^'model\.router_scoring' must be one of softmax, sigmoid, got 'tanh'$"),
        (
            {"mesh": {"data": -1, "tensor": -1}},
            (),
            r"^at most one mesh axis may be -1 .*, got -1 for 'mesh\.data' and 'mesh\.tensor'$",
        ),
        ({}, ["data.source=text"], r"^'data\.path' is required when 'data\.source' is 'text'"),
        ({}, ["data.source=tokens"], r"^'data\.path' is required when 'data\.source' is 'tokens'"),
        (
            {"data": {"source": "tokens", "path": "ids.bin"}},
            (),
            r"^'data\.path' must name a \.npy file when 'data\.source' is 'tokens', got 'ids\.bin'$",
        ),
        ({}, ["data.path=my_dir"], r"^'data\.path' is 'my_dir' but 'data\.source' is 'stdlib', which ignores it"),
    ],
)
def test_errors(mapping, overrides, message):
    with pytest.raises(ConfigError, match=message) as info:
        parse_config(mapping, overrides)
    text = str(info.value)
    assert "\n" not in text and ". " not in text.replace("e.g. ", "")  # one sentence


def test_config_error_is_a_value_error():
    assert issubclass(ConfigError, ValueError)


def test_head_dim_makes_odd_hidden_sizes_fine():
    config = parse_config({"model": {"num_heads": 5, "num_kv_heads": 5, "head_dim": 16}})
    assert config.model.resolved_head_dim == 16


def test_missing_file(tmp_path):
    path = tmp_path / "nope.yaml"
    with pytest.raises(ConfigError, match=r"^config file '.*nope\.yaml' does not exist$"):
        load_config(path)


def test_directory_is_not_a_config(tmp_path):
    with pytest.raises(ConfigError, match=r"is a directory, not a YAML file$"):
        load_config(tmp_path)


@pytest.mark.parametrize(
    "text, message",
    [
        ("- a\n- b\n", r"must hold a YAML mapping of sections \(model, mesh, train, data, checkpoint, rollback, fault, logging, compile\), got a list$"),
        ("just words\n", r"must hold a YAML mapping of sections .*, got a str$"),
        ("model: [\n", r"is not valid YAML: .* at line \d+$"),
    ],
)
def test_file_that_is_not_a_mapping(tmp_path, text, message):
    with pytest.raises(ConfigError, match=r"^config file '.*config\.yaml' " + message):
        load_config(write(tmp_path, text))


def test_file_errors_name_the_key(tmp_path):
    path = write(tmp_path, "train:\n  steps: -3\n")
    with pytest.raises(ConfigError, match=r"^'train\.steps' must be an integer >= 1, got -3$"):
        load_config(path)
    # An override can repair the file's value.
    assert load_config(path, ["train.steps=3"]).train.steps == 3


def test_parse_config_rejects_non_mappings():
    with pytest.raises(ConfigError, match=r"^a config must be a mapping of sections"):
        parse_config([1, 2])  # type: ignore[arg-type]


# -- the shipped configs -------------------------------------------------------


def test_shipped_configs_exist():
    names = {os.path.basename(p) for p in CONFIG_FILES}
    assert {"tiny.yaml", "llama-1b.yaml", "llama-8b.yaml"} <= names


@pytest.mark.parametrize("path", CONFIG_FILES, ids=os.path.basename)
def test_shipped_config_loads(path, tmp_path):
    config = load_config(path)
    assert isinstance(config, Config)
    # Every shipped file spells out every key, so typos in it cannot hide.
    raw = yaml.safe_load(Path(path).read_text())
    for name, cls in SECTIONS.items():
        if name != "data":
            assert set(raw[name]) == {f.name for f in dataclasses.fields(cls)}, name
    dump_config(config, tmp_path / "again.yaml")
    assert load_config(tmp_path / "again.yaml") == config


def test_shipped_model_shapes():
    by_name = {os.path.basename(p): load_config(p) for p in CONFIG_FILES}
    tiny, small, big = by_name["tiny.yaml"], by_name["llama-1b.yaml"], by_name["llama-8b.yaml"]
    assert tiny.model.vocab_size == 256 and tiny.mesh.tensor == 1
    assert (small.model.hidden_size, small.model.num_layers, small.model.num_heads, small.model.num_kv_heads,
            small.model.resolved_head_dim, small.model.ffn_hidden_size) == (2048, 16, 32, 8, 64, 8192)
    assert small.model.tie_embeddings and small.train.seq_len == 2048 and small.mesh.tensor == 8
    assert (big.model.hidden_size, big.model.num_layers, big.model.num_heads, big.model.num_kv_heads,
            big.model.resolved_head_dim, big.model.ffn_hidden_size) == (4096, 32, 32, 8, 128, 14336)
    assert not big.model.tie_embeddings and big.train.seq_len == 8192 and big.mesh.tensor == 8
    for config in (small, big):
        assert config.model.vocab_size == 128256 and config.model.rope_theta == 500000.0
        assert config.model.remat == "selective" and config.model.sequence_parallel
    assert load_config(REPO / "configs" / "tiny.yaml", ["mesh.tensor=8"]).mesh.tensor == 8
