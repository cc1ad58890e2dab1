# torchship on Google Cloud: one module per concern, wired here.

locals {
  name = "torchship-${var.environment}"
}

module "bucket" {
  source         = "./modules/bucket"
  name           = "${var.project}-${local.name}"
  region         = var.region
  retention_days = var.artifact_retention_days
}

module "registry" {
  source = "./modules/registry"
  name   = local.name
  region = var.region
}

module "service_account" {
  source  = "./modules/service_account"
  project = var.project
  name    = local.name
  bucket  = module.bucket.name
}

module "trigger" {
  source                = "./modules/trigger"
  project               = var.project
  region                = var.region
  name                  = "${local.name}-trigger"
  bucket                = module.bucket.name
  data_prefix           = var.data_prefix
  drift_threshold       = var.drift_threshold
  pipeline_template_uri = var.pipeline_template_uri
  pipeline_root         = "gs://${module.bucket.name}/pipeline-root"
  statistics_uri        = "gs://${module.bucket.name}/statistics/statistics.json"
  pipeline_sa_email     = module.service_account.email
  source_dir            = "${path.module}/../trigger"
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
  pipeline_root         = "gs://${module.bucket.name}/pipeline-root"
  pipeline_sa_email     = module.service_account.email
}
