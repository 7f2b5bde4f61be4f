"""Config parsing: YAML files and --section.key overrides, and the errors that name the bad key."""
import pytest

from ms_dfkd.config import ConfigError, load_config, parse_overrides


def test_yaml_and_overrides(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("run:\n  seed: 3\n  rounds: 2\nloss:\n  div: 0.25\n")
    cfg = load_config(p, parse_overrides(["--run.rounds", "5", "--corpus.sources=bbc,political",
                                          "--generator.chat_template", "false"]))
    assert cfg.run.seed == 3 and cfg.run.rounds == 5 and cfg.loss.div == 0.25
    assert cfg.corpus.sources == ["bbc", "political"] and cfg.generator.chat_template is False


@pytest.mark.parametrize("text, needle", [
    ("run:\n  sede: 3\n", "run.sede"),
    ("rnu:\n  seed: 3\n", "rnu"),
    ("run:\n  seed: three\n", "run.seed"),
    ("run:\n  method: magic\n", "run.method"),
    ("generator:\n  top_p: 1.5\n", "generator.top_p"),
    ("generator:\n  batch_size: 3\n", "generator.batch_size"),
    ("run: [1, 2]\n", "section 'run'"),
    ("run:\n  seed: [\n", "not valid YAML"),
])
def test_bad_config_names_the_key(tmp_path, text, needle):
    p = tmp_path / "bad.yaml"
    p.write_text(text)
    with pytest.raises(ConfigError, match=needle.replace("[", r"\[")):
        load_config(p)


def test_missing_config_file(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "nope.yaml")


def test_override_errors():
    with pytest.raises(ConfigError, match="no value"):
        parse_overrides(["--run.seed"])
    with pytest.raises(ConfigError, match="unknown config key 'loss.spc'"):
        load_config(None, [("loss.spc", "1")])
