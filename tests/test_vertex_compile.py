"""Production wiring in the compiled YAML: which image trains, where and as whom the Vertex AI
custom job runs, and each task's resources, retries and caching."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from torchship.pipelines import components
from torchship.pipelines.pipeline import RESOURCES, RETRIES, compile_pipeline, default_gpu_image

REGISTRY = "europe-west4-docker.pkg.dev/acme-ml/ml"
CPU_IMAGE, GPU_IMAGE = f"{REGISTRY}/torchship-cpu:0.1.0", f"{REGISTRY}/torchship-cuda:0.1.0"
TRITON_IMAGE = f"{REGISTRY}/torchship-tritonserver:0.1.0"
MEASURED = f"; benchmark and tune-serving in {TRITON_IMAGE})"
# The custom job's settings that come from pipeline parameters, by CustomJob field.
JOB_SETTINGS = {"location": "vertex_location", "service_account": "train_service_account",
                "network": "train_network",
                "encryption_spec_key_name": "train_encryption_spec_key_name"}
PASSED_THROUGH = {"tensorboard": "train_tensorboard",
                  "base_output_directory": "train_base_output_directory"}


def compiled(path: Path, platform: str, **images: str) -> dict:
    compile_pipeline(path, platform=platform, **images)
    return yaml.safe_load(path.read_text())


@pytest.fixture(scope="module")
def vertex(tmp_path_factory) -> dict:
    return compiled(tmp_path_factory.mktemp("vertex") / "pipeline.yaml", "vertex",
                    image=CPU_IMAGE)


@pytest.fixture(scope="module")
def kfp(tmp_path_factory) -> dict:
    return compiled(tmp_path_factory.mktemp("kfp") / "pipeline.yaml", "kfp", image=CPU_IMAGE)


def constant(task: dict, name: str):
    return task["inputs"]["parameters"][name]["runtimeValue"]["constant"]


def all_tasks(spec: dict) -> dict[str, dict]:
    """Every task of the pipeline, the ones under the gate's condition too, by name."""
    tasks = dict(spec["root"]["dag"]["tasks"])
    for component in spec["components"].values():
        tasks.update(component.get("dag", {}).get("tasks", {}))
    return tasks


def resources(spec: dict, task: str) -> dict:
    executor = all_tasks(spec)[task]["componentRef"]["name"].replace("comp-", "exec-", 1)
    return spec["deploymentSpec"]["executors"][executor]["container"].get("resources", {})


# -- which image trains ------------------------------------------------------------------------

def test_gpu_image_follows_the_tag_scheme_unless_given(monkeypatch):
    monkeypatch.delenv("TORCHSHIP_GPU_IMAGE", raising=False)
    assert default_gpu_image(CPU_IMAGE) == GPU_IMAGE
    assert default_gpu_image("torchship-cpu:0.1.0") == "torchship-cuda:0.1.0"
    assert default_gpu_image("localhost:5000/torchship-cpu") == "localhost:5000/torchship-cuda"
    # Named otherwise, or pinned by digest: no CUDA sibling to derive; the image is its own.
    assert default_gpu_image("example.local/trainer:1") == "example.local/trainer:1"
    assert default_gpu_image(f"{REGISTRY}/torchship-cpu@sha256:ab") == (
        f"{REGISTRY}/torchship-cpu@sha256:ab")
    monkeypatch.setenv("TORCHSHIP_GPU_IMAGE", "example.local/cuda:2")
    assert default_gpu_image(CPU_IMAGE) == "example.local/cuda:2"


def test_the_worker_pools_task_takes_both_images_and_decides_at_run_time(vertex):
    pools = vertex["root"]["dag"]["tasks"]["vertex-worker-pools"]
    assert constant(pools, "cpu_image") == CPU_IMAGE
    assert constant(pools, "gpu_image") == GPU_IMAGE
    for name in ("accelerator_type", "accelerator_count"):
        assert pools["inputs"]["parameters"][name] == {
            "componentInputParameter": f"train_{name}"}
    # What that task computes, from the compiled template and images, for either run.
    arguments = {name: constant(pools, name) for name in ("template", "cpu_image", "gpu_image")}
    on_gpus = components.vertex_worker_pools(**arguments, replica_count=2,
                                             machine_type="g2-standard-8",
                                             accelerator_type="NVIDIA_L4", accelerator_count=1)
    assert [p["container_spec"]["image_uri"] for p in on_gpus] == [GPU_IMAGE, GPU_IMAGE]
    assert on_gpus[0]["machine_spec"] == {"machine_type": "g2-standard-8",
                                          "accelerator_type": "NVIDIA_L4", "accelerator_count": 1}
    on_cpus = components.vertex_worker_pools(**arguments, replica_count=2,
                                             machine_type="n1-standard-8", accelerator_type="",
                                             accelerator_count=0)
    assert [p["container_spec"]["image_uri"] for p in on_cpus] == [CPU_IMAGE, CPU_IMAGE]
    # The train component's own command and executor placeholder, on either image.
    assert on_gpus[0]["container_spec"]["args"] == on_cpus[0]["container_spec"]["args"]
    assert "{{$.json_escape[1]}}" in on_gpus[0]["container_spec"]["args"]


def test_an_explicit_gpu_image_is_the_one_compiled_in(tmp_path):
    spec = compiled(tmp_path / "pipeline.yaml", "vertex", image="example.local/trainer:1",
                    gpu_image="example.local/trainer-cuda:1")
    pools = spec["root"]["dag"]["tasks"]["vertex-worker-pools"]
    assert constant(pools, "gpu_image") == "example.local/trainer-cuda:1"
    assert constant(pools, "cpu_image") == "example.local/trainer:1"


def test_compile_takes_gpu_image_and_says_which_images_it_compiled(tmp_path):
    done = subprocess.run(
        [sys.executable, "-m", "torchship.pipelines.cli", "compile", "--platform", "vertex",
         "--image", CPU_IMAGE, "--gpu-image", f"{REGISTRY}/custom-cuda:3", "-o",
         str(tmp_path / "pipeline.yaml")], check=True, capture_output=True, text=True)
    assert done.stdout.strip().endswith(
        f"(platform vertex, image {CPU_IMAGE}, GPU image {REGISTRY}/custom-cuda:3" + MEASURED)
    spec = yaml.safe_load((tmp_path / "pipeline.yaml").read_text())
    assert constant(spec["root"]["dag"]["tasks"]["vertex-worker-pools"], "gpu_image") == (
        f"{REGISTRY}/custom-cuda:3")


def test_the_kfp_platform_trains_in_one_task_of_the_cpu_image(kfp):
    train = kfp["deploymentSpec"]["executors"]["exec-train"]["container"]
    assert train["image"] == CPU_IMAGE and "accelerator" not in train["resources"]
    assert {name: e["container"]["image"] for name, e in kfp["deploymentSpec"]["executors"].items()
            if e["container"]["image"] != CPU_IMAGE} == {
        "exec-benchmark": TRITON_IMAGE, "exec-tune-serving": TRITON_IMAGE}


def test_the_kfp_platform_compiled_with_gpus_trains_in_the_gpu_image_on_them(tmp_path):
    """`compile --train-gpus N` (kfp, kubeflow): the one train task runs the GPU image and asks
    for N nvidia.com/gpu; every other task keeps the CPU image. On Vertex AI GPUs are run
    parameters, so the option is refused there in one line."""
    done = subprocess.run(
        [sys.executable, "-m", "torchship.pipelines.cli", "compile", "--platform", "kubeflow",
         "--image", CPU_IMAGE, "--train-gpus", "2", "-o", str(tmp_path / "pipeline.yaml")],
        check=True, capture_output=True, text=True)
    assert done.stdout.strip().endswith(f"GPU image {GPU_IMAGE} (train on 2 GPUs)" + MEASURED)
    spec = yaml.safe_load((tmp_path / "pipeline.yaml").read_text())
    executors = spec["deploymentSpec"]["executors"]
    train = executors["exec-train"]["container"]
    assert train["image"] == GPU_IMAGE
    assert train["resources"]["accelerator"]["resourceType"] == "nvidia.com/gpu"
    assert train["resources"]["accelerator"]["resourceCount"] == "2"
    assert {e["container"]["image"] for name, e in executors.items() if name != "exec-train"} == {
        CPU_IMAGE, TRITON_IMAGE}
    refused = subprocess.run(
        [sys.executable, "-m", "torchship.pipelines.cli", "compile", "--platform", "vertex",
         "--train-gpus", "1", "-o", str(tmp_path / "vertex.yaml")],
        check=False, capture_output=True, text=True)
    assert refused.returncode == 2 and not (tmp_path / "vertex.yaml").exists()
    assert refused.stderr.strip().splitlines() == [(
        "error: train_gpus is for the kfp platform; on Vertex AI pass the run parameters "
        "train_accelerator_type and train_accelerator_count instead")]


@pytest.mark.parametrize("platform", ["kubeflow", "vertex"])
def test_compression_and_benchmarks_on_gpus_when_requested(tmp_path, platform):
    """`--compress-gpus` and `--benchmark-gpus`: compress runs the GPU image, benchmark and
    tune-serving the Triton serving image, each asking for its GPUs (Kubernetes' nvidia.com/gpu
    on kfp; on Vertex AI the named chip: compress's task, and the measurements' custom jobs when
    the deploy settings name no accelerator); export, gate and deploy keep the CPU image and ask
    for none. Vertex AI needs the chip."""
    gpu_type = ["--gpu-type", "NVIDIA_L4"] if platform == "vertex" else []
    done = subprocess.run(
        [sys.executable, "-m", "torchship.pipelines.cli", "compile", "--platform", platform,
         "--image", CPU_IMAGE, "--compress-gpus", "1", "--benchmark-gpus", "2", *gpu_type,
         "-o", str(tmp_path / "pipeline.yaml")], check=True, capture_output=True, text=True)
    assert done.stdout.strip().endswith(
        f"GPU image {GPU_IMAGE} (compress on 1 GPU); benchmark and tune-serving in "
        f"{TRITON_IMAGE} on 2 GPUs)")
    spec = yaml.safe_load((tmp_path / "pipeline.yaml").read_text())
    executors = spec["deploymentSpec"]["executors"]
    chip = "NVIDIA_L4" if gpu_type else "nvidia.com/gpu"
    wanted = {"exec-compress": (GPU_IMAGE, "1")}
    if platform == "kubeflow":
        wanted.update({"exec-benchmark": (TRITON_IMAGE, "2"),
                       "exec-tune-serving": (TRITON_IMAGE, "2")})
    for name, (image, count) in wanted.items():
        container = executors[name]["container"]
        assert container["image"] == image, name
        accelerator = container["resources"]["accelerator"]
        assert accelerator["resourceType"] == chip
        assert accelerator["resourceCount"] == count, name
    for name in ("exec-export", "exec-gate", "exec-deploy", "exec-prepare-data"):
        container = executors[name]["container"]
        assert container["image"] == CPU_IMAGE and "accelerator" not in container["resources"]
    if platform == "vertex":
        tasks = all_tasks(spec)
        for pools in ("vertex-serving-pools", "vertex-serving-pools-2"):
            arguments = {name: constant(tasks[pools], name)
                         for name in ("template", "image", "gpus", "gpu_type")}
            assert (arguments["image"], arguments["gpus"], arguments["gpu_type"]) == (
                TRITON_IMAGE, 2, "NVIDIA_L4")
            machine = components.vertex_serving_pools(
                **{**arguments, "gpus": int(arguments["gpus"])},
                deploy_settings={"machine_type": "g2-standard-24"})[0]["machine_spec"]
            assert machine == {"machine_type": "g2-standard-24", "accelerator_type": "NVIDIA_L4",
                               "accelerator_count": 2}
        refused = subprocess.run(
            [sys.executable, "-m", "torchship.pipelines.cli", "compile", "--platform", platform,
             "--compress-gpus", "1", "-o", str(tmp_path / "untyped.yaml")],
            check=False, capture_output=True, text=True)
        assert refused.returncode == 2 and not (tmp_path / "untyped.yaml").exists()
        assert refused.stderr.strip().splitlines() == [(
            "error: gpu_type is not set; Vertex AI tasks with GPUs need the chip, e.g. "
            "--gpu-type NVIDIA_L4 (or NVIDIA_TESLA_T4)")]


# -- where and as whom the custom job runs --------------------------------------------------------

def test_the_custom_job_runs_where_and_as_whom_the_pipeline_parameters_say(vertex):
    declared = vertex["root"]["inputDefinitions"]["parameters"]
    for name in (*JOB_SETTINGS.values(), *PASSED_THROUGH.values()):
        assert declared[name] == {"defaultValue": "", "isOptional": True,
                                  "parameterType": "STRING"}, name
    tasks = vertex["root"]["dag"]["tasks"]
    settings = tasks["vertex-job-settings"]["inputs"]["parameters"]
    train = tasks["train"]["inputs"]["parameters"]
    for field, parameter in JOB_SETTINGS.items():
        assert settings[field] == {"componentInputParameter": parameter}, field
        # The CustomJob's field is that task's output: the parameter, or the pipeline job's own.
        assert train[field] == {"taskOutputParameter": {
            "outputParameterKey": field, "producerTask": "vertex-job-settings"}}, field
    for field, parameter in PASSED_THROUGH.items():
        assert train[field] == {"componentInputParameter": parameter}, field
    # Vertex AI fills in the running pipeline job's own settings.
    job = tasks["vertex-job-settings"]
    assert constant(job, "pipeline_location") == "{{$.pipeline_google_cloud_location}}"
    assert constant(job, "pipeline_service_account") == "{{$.pipeline_service_account}}"
    assert constant(job, "pipeline_network") == "{{$.pipeline_network}}"
    assert constant(job, "pipeline_encryption_spec_key_name") == (
        "{{$.pipeline_encryption_key_name}}")
    assert job["cachingOptions"].get("enableCache") is not True  # placeholders differ by run
    # The train task is GCPC's CustomJob launcher: these inputs are CustomJobSpec fields.
    launcher = vertex["deploymentSpec"]["executors"]["exec-train"]["container"]
    assert "custom_job.launcher" in " ".join(launcher["command"])
    payload = " ".join(launcher["args"])
    for field in ("service_account", "network", "tensorboard", "kms_key_name",
                  "output_uri_prefix"):
        assert f'"{field}"' in payload, field


def test_an_empty_setting_is_the_pipeline_jobs_own():
    pipeline_job = {"pipeline_location": "europe-west4",
                    "pipeline_service_account": "pipelines@acme.iam.gserviceaccount.com",
                    "pipeline_network": "projects/1/global/networks/ml",
                    "pipeline_encryption_spec_key_name": "projects/acme/locations/eu/keyRings/r/"
                                                         "cryptoKeys/k"}
    inherited = components.vertex_job_settings("", "", "", "", **pipeline_job)
    assert tuple(inherited) == tuple(pipeline_job.values())
    assert inherited._fields == tuple(JOB_SETTINGS)
    chosen = components.vertex_job_settings(
        "us-central1", "trainer@acme.iam.gserviceaccount.com", "projects/1/global/networks/gpu",
        "projects/acme/locations/us/keyRings/r/cryptoKeys/train", **pipeline_job)
    assert chosen.location == "us-central1"
    assert chosen.service_account == "trainer@acme.iam.gserviceaccount.com"
    assert chosen.network == "projects/1/global/networks/gpu"
    assert chosen.encryption_spec_key_name.endswith("/cryptoKeys/train")


@pytest.mark.filterwarnings("ignore:You may be attemping to run a task:RuntimeWarning")
def test_the_custom_job_helpers_run_as_kfp_components(tmp_path):
    """Both helpers under kfp.local, as Vertex AI runs them: typed outputs, a list and a tuple."""
    from kfp import local

    from torchship.pipelines.components import build_components

    local.init(runner=local.SubprocessRunner(use_venv=False),
               pipeline_root=str(tmp_path / "runs"))
    ops = build_components(CPU_IMAGE, gpu_image=GPU_IMAGE)
    template = json.dumps({"container_spec": {"image_uri": CPU_IMAGE, "args": ["x"]}})
    pools = ops.vertex_worker_pools(template=template, replica_count=3,
                                    machine_type="g2-standard-8", accelerator_type="NVIDIA_L4",
                                    accelerator_count=1, cpu_image=CPU_IMAGE,
                                    gpu_image=GPU_IMAGE)
    assert [p["replica_count"] for p in pools.output] == [1, 2]
    assert {p["container_spec"]["image_uri"] for p in pools.output} == {GPU_IMAGE}
    settings = ops.vertex_job_settings(
        location="", service_account="trainer@acme.iam.gserviceaccount.com", network="",
        encryption_spec_key_name="", pipeline_location="europe-west4",
        pipeline_service_account="pipelines@acme.iam.gserviceaccount.com",
        pipeline_network="", pipeline_encryption_spec_key_name="")
    assert settings.outputs["location"] == "europe-west4"
    assert settings.outputs["service_account"] == "trainer@acme.iam.gserviceaccount.com"
    assert settings.outputs["network"] == ""


# -- resources, retries, caching ------------------------------------------------------------------

@pytest.mark.parametrize("platform", ["kfp", "vertex"])
def test_every_stage_asks_for_its_resources_and_retries_where_a_retry_helps(
        platform, kfp, vertex):
    spec = {"kfp": kfp, "vertex": vertex}[platform]
    tasks = all_tasks(spec)
    stages = ["prepare-data", "compress", "export", "benchmark", "gate", "tune-serving", "deploy"]
    if platform == "kfp":
        stages.append("train")
    for stage in stages:
        cpu_request, cpu_limit, memory_request, memory_limit = RESOURCES[stage]
        asked = resources(spec, stage)
        retry = tasks[stage].get("retryPolicy", {}).get("maxRetryCount", 0)
        assert retry == RETRIES.get(stage, 0), stage
        if platform == "vertex" and stage in components.MEASURING:
            # A custom job on the deploy's machine: its launcher asks for nothing.
            assert "accelerator" not in asked and "resourceCpuLimit" not in asked, stage
            continue
        assert asked["resourceCpuLimit"] == cpu_limit, stage
        assert asked["resourceMemoryLimit"] == memory_limit, stage
        if platform == "kfp":  # Kubernetes schedules by the requests
            assert asked["resourceCpuRequest"] == cpu_request, stage
            assert asked["resourceMemoryRequest"] == memory_request, stage
        else:  # Vertex AI picks the machine by the limits
            assert "resourceCpuRequest" not in asked, stage
    assert tasks["prepare-data"]["retryPolicy"]["backoffDuration"] == "30s"
    # Never retried: training (hours), the gate (a decision), the deploy (it changes what serves).
    for stage in ("train", "gate", "deploy"):
        assert "retryPolicy" not in tasks[stage], stage
    if platform == "vertex":
        for helper in ("vertex-worker-pools", "vertex-job-settings", "vertex-serving-pools",
                       "vertex-serving-pools-2", "vertex-job-settings-2"):
            assert tasks[helper]["retryPolicy"]["maxRetryCount"] == 2
            assert resources(spec, helper)["resourceCpuLimit"] == "1"


@pytest.mark.parametrize("platform", ["kfp", "vertex"])
def test_deploy_and_prepare_data_are_never_cached(platform, kfp, vertex):
    tasks = all_tasks({"kfp": kfp, "vertex": vertex}[platform])
    assert tasks["deploy"]["cachingOptions"].get("enableCache") is not True
    assert tasks["prepare-data"]["cachingOptions"].get("enableCache") is not True
    assert tasks["train"]["cachingOptions"]["enableCache"] is True


# -- the Triton measurements on the serving machine --------------------------------------------

def parameter(argument: dict) -> str:
    """The pipeline parameter an argument takes (under the gate's condition, as its channel)."""
    return argument["componentInputParameter"].removeprefix("pipelinechannel--")


def test_on_vertex_the_measurements_are_custom_jobs_on_a_machine_like_the_deploys(vertex):
    """Benchmark and tune-serving run as custom jobs of the Triton serving image on one machine
    like the deploy's: `deploy_settings` machine type and accelerator, decided at run time."""
    import inspect

    from torchship.components.deploy.targets.vertex import deploy_vertex
    from torchship.pipelines.vertex import SERVING_MACHINE_TYPE

    tasks = all_tasks(vertex)
    for stage, pools in (("benchmark", "vertex-serving-pools"),
                         ("tune-serving", "vertex-serving-pools-2")):
        task = tasks[stage]["inputs"]["parameters"]
        assert task["worker_pool_specs"]["taskOutputParameter"]["producerTask"] == pools
        assert parameter(task["serving_backend"]) == "benchmark_backend"
        assert parameter(tasks[pools]["inputs"]["parameters"]["deploy_settings"]) == (
            "deploy_settings")
        arguments = {name: constant(tasks[pools], name)
                     for name in ("template", "image", "gpus", "gpu_type")}
        assert (arguments["image"], arguments["gpus"], arguments["gpu_type"]) == (
            TRITON_IMAGE, 0, "")
        arguments["gpus"] = 0
        [pool] = components.vertex_serving_pools(**arguments, deploy_settings={})
        assert pool["replica_count"] == 1 and pool["container_spec"]["image_uri"] == TRITON_IMAGE
        assert pool["machine_spec"] == {"machine_type": SERVING_MACHINE_TYPE}
        function = pool["container_spec"]["args"]
        assert function[function.index("--function_to_execute") + 1] == stage.replace("-", "_")
        [pool] = components.vertex_serving_pools(**arguments, deploy_settings={
            "machine_type": "g2-standard-8", "accelerator_type": "NVIDIA_L4",
            "accelerator_count": 1})
        assert pool["machine_spec"] == {"machine_type": "g2-standard-8",
                                        "accelerator_type": "NVIDIA_L4", "accelerator_count": 1}
    # The machine a deploy with no machine_type serves on.
    default = inspect.signature(deploy_vertex).parameters["machine_type"].default
    assert SERVING_MACHINE_TYPE == default


def test_on_kubeflow_the_measurements_run_the_serving_image_with_the_backend_parameter(kfp):
    tasks = all_tasks(kfp)
    executors = kfp["deploymentSpec"]["executors"]
    for stage in ("benchmark", "tune-serving"):
        assert executors[f"exec-{stage}"]["container"]["image"] == TRITON_IMAGE
        assert parameter(tasks[stage]["inputs"]["parameters"]["serving_backend"]) == (
            "benchmark_backend")
    assert kfp["root"]["inputDefinitions"]["parameters"]["benchmark_backend"][
        "defaultValue"] == "auto"
