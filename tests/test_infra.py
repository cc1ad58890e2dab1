"""Static checks of infra/terraform, since no terraform binary or cloud is reachable here.

`terraform validate` needs the providers; what it would catch without them is checked here from
the parsed HCL: every file parses, every reference names something declared, every module call
passes exactly its module's variables, the env files set only declared variables, and the
trigger function is given the settings infra/trigger/main.py reads. The retraining loop's wiring
(issue 16) is checked the same way: the trigger watches the data bucket only, may be invoked by
Eventarc, every API is enabled, the schedule passes its parameter values, the reference is kept.
`terraform fmt -check` runs where the binary is installed.
"""

from __future__ import annotations

import re
import shutil
import subprocess
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
    # Every module is used; a module may be called more than once (the two buckets).
    assert {root.module_dir(name).name for name in root.modules} == {
        d.name for d in (TERRAFORM / "modules").iterdir()}
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


# The retraining loop's wiring (issue 16).

API_NAMES = {"aiplatform", "cloudfunctions", "run", "eventarc", "pubsub", "artifactregistry",
             "cloudbuild", "storage", "cloudscheduler", "dataflow", "iam", "logging"}


def parsed(config: Config) -> dict:
    return hcl2.loads(config.text)


def resources(config: Config, type_: str) -> dict[str, dict]:
    """NAME -> body of every resource of TYPE in the module."""
    return {unquote(name): body for block in parsed(config).get("resource", [])
            for kind, named in block.items() if unquote(kind) == type_
            for name, body in named.items()}


def root_local(name: str) -> str:
    (value,) = [block[name] for block in parsed(Config(TERRAFORM)).get("locals", [])
                if name in block]
    return value


def test_trigger_watches_the_data_bucket_not_the_pipeline_bucket():
    root = Config(TERRAFORM)
    trigger, data_bucket, bucket = (root.modules[n] for n in ("trigger", "data_bucket", "bucket"))
    assert root.module_dir("data_bucket") == root.module_dir("bucket")
    assert unquote(data_bucket["name"]) != unquote(bucket["name"])
    assert data_bucket["versioning"] is True  # earlier generations of the data are kept
    assert "retention_days" not in data_bucket  # no lifecycle deletion of data by default
    assert "default" in root.variables["data_noncurrent_retention_days"]
    assert root.variables["data_noncurrent_retention_days"]["default"] == 0
    assert trigger["data_bucket"] == "${module.data_bucket.name}"
    assert trigger["pipeline_bucket"] == "${module.bucket.name}"

    module = Config(root.module_dir("trigger"))
    (function,) = resources(module, "google_cloudfunctions2_function").values()
    (event_trigger,) = function["event_trigger"]
    filters = {unquote(f["attribute"]): f["value"] for f in event_trigger["event_filters"]}
    assert filters == {"bucket": "${var.data_bucket}"}
    environment = function["service_config"][0]["environment_variables"]
    assert unquote(environment["DATA_PREFIX"]) == "gs://${var.data_bucket}/${var.data_prefix}"
    # The function's source is kept in the pipeline bucket: uploading it wakes nothing.
    (source,) = resources(module, "google_storage_bucket_object").values()
    assert source["bucket"] == "${var.pipeline_bucket}"


def test_trigger_account_may_receive_events_and_invoke_the_function():
    module = Config(TERRAFORM / "modules" / "trigger")
    account = "serviceAccount:${google_service_account.trigger.email}"
    (function,) = resources(module, "google_cloudfunctions2_function").values()
    assert function["event_trigger"][0]["service_account_email"] == (
        "${google_service_account.trigger.email}")

    invokers = [body for type_ in ("google_cloud_run_v2_service_iam_member",
                                   "google_cloud_run_service_iam_member")
                for body in resources(module, type_).values()
                if unquote(body["role"]) == "roles/run.invoker"]
    assert len(invokers) == 1
    (invoker,) = invokers
    assert unquote(invoker["member"]) == account
    service = invoker.get("name", invoker.get("service"))
    assert service == "${google_cloudfunctions2_function.trigger.service_config[0].service}"

    project_roles = resources(module, "google_project_iam_member")
    assert "roles/eventarc.eventReceiver" in project_roles["trigger"]["for_each"]
    assert unquote(project_roles["trigger"]["member"]) == account
    publisher = project_roles["gcs_publishes"]
    assert unquote(publisher["role"]) == "roles/pubsub.publisher"
    assert "data.google_storage_project_service_account.gcs.email_address" in publisher["member"]


def test_every_api_is_enabled_before_anything_uses_it():
    root = Config(TERRAFORM)
    enabled = set(re.findall(r'"(\w+)\.googleapis\.com"', root_local("apis")))
    assert API_NAMES <= enabled, f"not enabled: {API_NAMES - enabled}"
    (service,) = resources(root, "google_project_service").values()
    assert service["for_each"] == "${toset(local.apis)}"
    assert service["disable_on_destroy"] is False
    for name, call in root.modules.items():
        assert "${google_project_service.apis}" in call.get("depends_on", []), name


def test_schedule_posts_its_parameter_values():
    root = Config(TERRAFORM)
    assert root.variables["schedule_parameter_values"]["default"] == {}
    assert root.modules["schedule"]["parameter_values"] == "${var.schedule_parameter_values}"
    module = Config(root.module_dir("schedule"))
    (job,) = resources(module, "google_cloud_scheduler_job").values()
    body = job["http_target"][0]["body"]
    runtime_config = re.search(r"runtimeConfig = \{(.*?)\}, labels = ", body)
    assert runtime_config, body
    # Every scheduled run keeps the reference where the trigger reads it.
    assert ("parameterValues = merge(var.parameter_values, {reference_uri = var.reference_uri})"
            in runtime_config[1])
    assert "gcsOutputDirectory = var.pipeline_root" in runtime_config[1]
    assert root.modules["schedule"]["reference_uri"] == "${local.reference_uri}"
    assert "default" not in module.variables["reference_uri"]


def test_trigger_submits_the_schedule_parameter_values_but_its_own():
    """The trigger's runs get the schedule's parameter values (PARAMETER_VALUES), less the two
    the function sets itself, deploying where the reference it reads is kept."""
    root = Config(TERRAFORM)
    assert root.modules["trigger"]["parameter_values"] == "${local.trigger_parameter_values}"
    values = root_local("trigger_parameter_values")
    merged = re.fullmatch(r"\$\{merge\(\{for (\w+), (\w+) in var\.schedule_parameter_values : "
                          r"\1 => \2 if !contains\(\[(.*?)\], \1\)\}, "
                          r"\{deploy_target = var\.deploy_target\}\)\}", values)
    assert merged, values
    assert {unquote(n.strip()) for n in merged[3].split(",")} == {"data_source", "reference_uri"}

    module = Config(root.module_dir("trigger"))
    assert "default" not in module.variables["parameter_values"]
    (function,) = resources(module, "google_cloudfunctions2_function").values()
    environment = function["service_config"][0]["environment_variables"]
    assert environment["PARAMETER_VALUES"] == "${jsonencode(var.parameter_values)}"
    # The names the function refuses in PARAMETER_VALUES are the ones left out here.
    assert re.search(r'TRIGGER_PARAMETERS = \("data_source", "reference_uri"\)',
                     TRIGGER.read_text())


def test_function_reads_the_reference_and_the_drift_thresholds():
    root = Config(TERRAFORM)
    module = Config(root.module_dir("trigger"))
    (function,) = resources(module, "google_cloudfunctions2_function").values()
    environment = function["service_config"][0]["environment_variables"]
    assert {"REFERENCE_URI", "DRIFT_THRESHOLD", "PSI_THRESHOLD",
            "LABEL_DRIFT_THRESHOLD", "FEATURE_THRESHOLDS"} <= set(environment)
    assert environment["FEATURE_THRESHOLDS"] == "${jsonencode(var.feature_thresholds)}"
    assert root.modules["trigger"]["feature_thresholds"] == "${var.feature_drift_thresholds}"
    assert root.variables["feature_drift_thresholds"]["default"] == {}
    assert "STATISTICS_URI" not in environment
    assert environment["REFERENCE_URI"] == "${var.reference_uri}"
    for name, default in (("drift_threshold", 0.1), ("psi_threshold", 0.2),
                          ("label_drift_threshold", 0.1)):
        assert root.variables[name]["default"] == default
        assert root.modules["trigger"][name] == f"${{var.{name}}}"

    # The reference: one folder per pipeline and deploy target, under the pipeline root.
    assert unquote(root_local("pipeline_root")) == "gs://${module.bucket.name}/pipeline-root"
    assert unquote(root_local("reference_uri")) == (
        "${local.pipeline_root}/torchship-reference/${local.pipeline_name}/${var.deploy_target}/")
    assert unquote(root_local("pipeline_name")) == "torchship"
    assert unquote(root.variables["deploy_target"]["default"]) == "vertex"
    assert root.modules["trigger"]["reference_uri"] == "${local.reference_uri}"
    assert {"data_bucket", "reference_uri", "decisions_uri", "pipeline_root",
            "docker_repository", "pipeline_template_host",
            "pipeline_service_account"} <= root.outputs


def test_artifact_expiry_keeps_the_reference():
    root = Config(TERRAFORM)
    prefixes = root.modules["bucket"]["expire_prefixes"]
    generated = re.fullmatch(r'\$\{\[for (\w+) in range\((\d+)\) : "([^"$]*)\$\{\1\}"\]\}',
                             prefixes) if isinstance(prefixes, str) else None
    if generated:
        prefixes = [f"{generated[3]}{i}" for i in range(int(generated[2]))]
    else:
        assert isinstance(prefixes, list), f"cannot read expire_prefixes {prefixes}"
        prefixes = [unquote(p) for p in prefixes]
    assert prefixes, "nothing expires"
    assert not [p for p in prefixes if "pipeline-root/torchship-reference/".startswith(p)]
    assert "pipeline-root/1234567890/torchship-20250101/".startswith(tuple(prefixes))


@pytest.mark.skipif(shutil.which("terraform") is None, reason="terraform is not installed")
def test_terraform_fmt_is_clean():
    result = subprocess.run(["terraform", "fmt", "-check", "-recursive", str(TERRAFORM)],
                            check=False, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, f"terraform fmt would change: {result.stdout}"
