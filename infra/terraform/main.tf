# torchship on Google Cloud: one module per concern, wired here.

locals {
  name          = "torchship-${var.environment}"
  pipeline_name = "torchship" # the compiled pipeline's name
  pipeline_root = "gs://${module.bucket.name}/pipeline-root"
  # What serves now and what it was trained on, per pipeline and deploy target: statistics.json,
  # serving.json and decisions/ (the trigger's record of each event), written by the pipeline
  # and the trigger, read by the trigger.
  reference_uri = "${local.pipeline_root}/torchship-reference/${local.pipeline_name}/${var.deploy_target}/"
  # What every triggered run gets: the schedule's parameter values but data_source and
  # reference_uri (the trigger sets them: the new object, the reference above), deploying to
  # deploy_target, whose reference the trigger reads.
  trigger_parameter_values = merge(
    { for name, value in var.schedule_parameter_values : name => value if !contains(["data_source", "reference_uri"], name) },
    { deploy_target = var.deploy_target },
  )

  apis = concat([
    "aiplatform.googleapis.com",       # pipelines, training, endpoints
    "artifactregistry.googleapis.com", # images, pipeline templates
    "cloudbuild.googleapis.com",       # images; the function's build
    "cloudfunctions.googleapis.com",   # the trigger
    "dataflow.googleapis.com",         # prepare-data with data_runner=DataflowRunner
    "eventarc.googleapis.com",         # storage events to the trigger
    "iam.googleapis.com",              # service accounts
    "logging.googleapis.com",          # the function's and the runs' logs
    "pubsub.googleapis.com",           # Eventarc's transport for storage events
    "run.googleapis.com",              # the function's service
    "storage.googleapis.com",          # the buckets
  ], var.schedule_cron == "" ? [] : ["cloudscheduler.googleapis.com"])
}

resource "google_project_service" "apis" {
  for_each           = toset(local.apis)
  project            = var.project
  service            = each.value
  disable_on_destroy = false
}

# The pipeline bucket: pipeline root, references, the function's source. Vertex AI writes each
# run under pipeline-root/PROJECT_NUMBER/, so only those folders expire (a lifecycle rule cannot
# exclude a prefix): the reference under pipeline-root/torchship-reference/ is kept.
module "bucket" {
  source          = "./modules/bucket"
  name            = "${var.project}-${local.name}"
  region          = var.region
  retention_days  = var.artifact_retention_days
  expire_prefixes = [for digit in range(10) : "pipeline-root/${digit}"]
  depends_on      = [google_project_service.apis]
}

# The data bucket: new data lands under data_prefix and wakes the trigger; versioned, so a
# replaced object's earlier generation (the data an earlier run trained on) is kept.
module "data_bucket" {
  source                    = "./modules/bucket"
  name                      = "${var.project}-${local.name}-data"
  region                    = var.region
  versioning                = true
  noncurrent_retention_days = var.data_noncurrent_retention_days
  depends_on                = [google_project_service.apis]
}

module "registry" {
  source     = "./modules/registry"
  name       = local.name
  region     = var.region
  depends_on = [google_project_service.apis]
}

module "service_account" {
  source      = "./modules/service_account"
  project     = var.project
  name        = local.name
  bucket      = module.bucket.name
  data_bucket = module.data_bucket.name
  depends_on  = [google_project_service.apis]
}

module "trigger" {
  source                = "./modules/trigger"
  project               = var.project
  region                = var.region
  name                  = "${local.name}-trigger"
  pipeline_bucket       = module.bucket.name
  data_bucket           = module.data_bucket.name
  data_prefix           = var.data_prefix
  reference_uri         = local.reference_uri
  parameter_values      = local.trigger_parameter_values
  drift_threshold       = var.drift_threshold
  psi_threshold         = var.psi_threshold
  label_drift_threshold = var.label_drift_threshold
  feature_thresholds    = var.feature_drift_thresholds
  pipeline_template_uri = var.pipeline_template_uri
  pipeline_root         = local.pipeline_root
  pipeline_sa_email     = module.service_account.email
  source_dir            = "${path.module}/../trigger"
  depends_on            = [google_project_service.apis]
}

module "schedule" {
  count                 = var.schedule_cron == "" ? 0 : 1
  source                = "./modules/schedule"
  project               = var.project
  region                = var.region
  name                  = "${local.name}-schedule"
  cron                  = var.schedule_cron
  time_zone             = var.schedule_time_zone
  pipeline_template_uri = var.pipeline_template_uri
  pipeline_root         = local.pipeline_root
  pipeline_sa_email     = module.service_account.email
  parameter_values      = var.schedule_parameter_values
  reference_uri         = local.reference_uri
  depends_on            = [google_project_service.apis]
}

# A scheduled run that deploys elsewhere writes its reference where the trigger does not look.
check "schedule_deploys_where_the_reference_is" {
  assert {
    condition     = try(var.schedule_parameter_values.deploy_target, var.deploy_target) == var.deploy_target
    error_message = "schedule_parameter_values.deploy_target differs from deploy_target (${var.deploy_target}): the trigger reads ${local.reference_uri}."
  }
}
