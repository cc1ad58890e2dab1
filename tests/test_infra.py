"""Static checks of infra/terraform, since no terraform binary or cloud is reachable here.

`terraform validate` needs the providers; what it would catch without them is checked here from
the parsed HCL: every file parses, every reference names something declared, every module call
passes exactly its module's variables, the env files set only declared variables, and the
trigger function is given the settings infra/trigger/main.py reads.
"""

from __future__ import annotations

import re
from pathlib import Path

import hcl2
import pytest

TERRAFORM = Path(__file__).resolve().parents[1] / "infra" / "terraform"
TRIGGER = TERRAFORM.parent / "trigger" / "main.py"
MODULE_META_ARGUMENTS = {"source", "count", "for_each", "depends_on", "providers", "version"}
# Names HCL expressions may start with that are not declarations of the module.
BUILTIN_ROOTS = {"var", "local", "module", "data", "path", "each", "count", "self", "terraform"}


def unquote(key: str) -> str:
    return key.strip('"')


class Config:
    """One Terraform module (a directory): its declarations and the text of its expressions."""

    def __init__(self, directory: Path):
        self.directory = directory
        self.text = ""
        self.variables: dict[str, dict] = {}
        self.locals: set[str] = set()
        self.outputs: set[str] = set()
        self.resources: set[tuple[str, str]] = set()
        self.data: set[tuple[str, str]] = set()
        self.modules: dict[str, dict] = {}
        for path in sorted(directory.glob("*.tf")):
            text = path.read_text()
            self.text += text
            with path.open() as handle:
                parsed = hcl2.load(handle)  # raises on a syntax error
            for block in parsed.get("variable", []):
                for name, body in block.items():
                    self.variables[unquote(name)] = body
            for block in parsed.get("locals", []):
                self.locals |= {key for key in block if not key.startswith("__")}
            for block in parsed.get("output", []):
                self.outputs |= {unquote(name) for name in block}
            for kind, declared in (("resource", self.resources), ("data", self.data)):
                for block in parsed.get(kind, []):
                    for type_, named in block.items():
                        declared |= {(unquote(type_), unquote(name)) for name in named}
            for block in parsed.get("module", []):
                for name, body in block.items():
                    self.modules[unquote(name)] = body

    def references(self, pattern: str) -> set[tuple[str, ...]]:
        # Comments may mention names in prose; only code counts.
        code = re.sub(r"#[^\n]*", "", self.text)
        return {match if isinstance(match, tuple) else (match,)
                for match in re.findall(pattern, code)}

    def module_dir(self, name: str) -> Path:
        return (self.directory / unquote(self.modules[name]["source"])).resolve()


def configs() -> list[Config]:
    return [Config(TERRAFORM), *(Config(d) for d in sorted((TERRAFORM / "modules").iterdir()))]


@pytest.mark.parametrize("config", configs(), ids=lambda c: str(c.directory.relative_to(TERRAFORM)))
def test_every_reference_is_declared(config):
    assert config.text, f"{config.directory} has no .tf files"
    assert {v for (v,) in config.references(r"\bvar\.(\w+)")} <= set(config.variables)
    assert {v for (v,) in config.references(r"\blocal\.(\w+)")} <= config.locals
    assert config.references(r"\bdata\.(\w+)\.(\w+)") <= config.data
    # A resource is referred to as TYPE.NAME (a data source as data.TYPE.NAME).
    assert config.references(r"(?<![\w.])(google_\w+)\.(\w+)") <= config.resources
    for name, attribute in config.references(r"\bmodule\.(\w+)\.(\w+)"):
        assert name in config.modules, f"module.{name} is not declared"
        called = Config(config.module_dir(name))
        assert attribute in called.outputs, f"module.{name} has no output '{attribute}'"


def test_module_calls_pass_exactly_the_module_variables():
    root = Config(TERRAFORM)
    assert set(root.modules) == {d.name for d in (TERRAFORM / "modules").iterdir()}
    for name, call in root.modules.items():
        module = Config(root.module_dir(name))
        passed = {key for key in call if not key.startswith("__")} - MODULE_META_ARGUMENTS
        required = {v for v, body in module.variables.items() if "default" not in body}
        unknown = passed - set(module.variables)
        assert not unknown, f"module {name}: no variable {unknown}"
        assert required <= passed, f"module {name}: missing {required - passed}"


@pytest.mark.parametrize("env_file", sorted((TERRAFORM / "envs").glob("*.tfvars")),
                         ids=lambda p: p.name)
def test_env_files_set_declared_variables(env_file):
    root = Config(TERRAFORM)
    with env_file.open() as handle:
        values = hcl2.load(handle)
    values = {key for key in values if not key.startswith("__")}  # the parser's comments
    assert values <= set(root.variables)
    # `project` comes on the command line (the file's first comment says how); the rest is here.
    required = {v for v, body in root.variables.items() if "default" not in body} - {"project"}
    assert required <= values
    assert "-var project=" in env_file.read_text()


def test_trigger_function_gets_the_settings_its_code_reads():
    trigger = Config(TERRAFORM / "modules" / "trigger")
    (function,) = [body for block in hcl2.loads(trigger.text).get("resource", [])
                   for type_, named in block.items()
                   if unquote(type_) == "google_cloudfunctions2_function"
                   for body in named.values()]
    given = set(function["service_config"][0]["environment_variables"]) - {"__is_block__"}
    code = TRIGGER.read_text()
    read = set(re.findall(r'env(?:\.get\(|\[)"(\w+)"', code))
    required = set(re.findall(r'"(\w+)"', re.search(r"missing = \[.*?\]", code, re.DOTALL)[0]))
    assert required <= given, f"the function needs {required - given}"
    assert given <= read, f"the function never reads {given - read}"
    assert unquote(function["build_config"][0]["entry_point"]) in re.findall(
        r"^def (\w+)", code, re.MULTILINE)
